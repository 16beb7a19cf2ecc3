Multiply loops whose counter is zero touch nothing: no tape error at cell zero
[-<+>][<<<+>>>-][>>>>>>>>>>[-]<<<<<<<<<<-]
++++++++[>++++++++<-]>+.
