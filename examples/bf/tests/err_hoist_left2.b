A right walk whose multiply loop reaches left of cell 0 in its second iteration: the checked
copy of the loop must stay in use until the whole reach is on the tape
>+>>+>>+>>+<+<<<<<
[>>>[-<<<<<<<+>>>>>>>]<]
