A unit replaced while its frame is below a stub call: the inner loop first runs in the
second iteration of the outer one after the outer loop was compiled with a stub for it
++++++++[>[-.]++<-]
