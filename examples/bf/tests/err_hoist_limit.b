A left walk whose multiply loop (range tested once at the loop head) does reach past a 64 cell tape
>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>
+>>+>>+>>+>>+>>+>>+<<<+>>>
[<<<[->>>>>>>>>>+<<<<<<<<<<]>]
