A folded loop near the right end of the tape
++[>++[>>>>>>>>>>+<<<<<<<<<<-]<-]
