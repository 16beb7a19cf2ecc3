Cell wrap around in every direction
-.                      zero minus one is 255
+.                      255 plus one is zero
++++++++[>++++++++<-]>[<++++>-]<.       64 times 4 is 256 which is zero
>>++++[+>+<]>.          counting up loop runs 252 times as a multiply loop
>++++++[->-------<]>.   zero minus 42 is 214
[+]+++++++++++++++++++++++++++++++++++++++++++++++++++++.   clear by counting up then digit 5
>-[--->+<]>.            255 by 3 is 85 iterations of a non unit loop
