Loops whose range tests are hoisted to the loop head: a right walk from cell 1 whose
multiply loop could reach the cell left of cell 0 (never taken there) and a left walk
near the end of a 64 cell tape whose multiply loop could reach beyond it (never taken)
>+>>+>>+>>+<<<<<<
[>>>[-<<<<<+>>>>>]<]
>++++++++[>++++++++<-]>+.
>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>
+>>+>>+>>+>>+>>+>>+
[<<<[->>>>>>>>>>+<<<<<<<<<<]>]
++++++++[>++++++++<-]>++.
