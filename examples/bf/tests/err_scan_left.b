A compiled left scan from cell 0 runs off the tape
+[[<]]
