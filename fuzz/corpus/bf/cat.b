cat for eof zero: read until a zero arrives
,[.,]
