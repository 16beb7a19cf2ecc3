A left walk whose multiply loop reaches past a 64 cell tape in its second iteration: the checked
copy of the loop must stay in use until the whole reach is on the tape
>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>
+>>+>>+>>+>>+>>+>>+<<<<<+>>>>>
[<<<[->>>>>>>>>>+<<<<<<<<<<]>]
