Counter stepping by 2 around a multiply loop: must stay a loop
++++[>+++[>+<-]<--]
