cat for eof minus1
,+[-.,+]
