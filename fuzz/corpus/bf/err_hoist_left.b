A right walk whose multiply loop (range tested once at the loop head) does reach left of cell 0
>+>>+>>+>>+<<<+<<<
[>>>[-<<<<<+>>>>>]<]
