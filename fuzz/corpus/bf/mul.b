Multiply and clear and scan loops with offset addressing
++++++[->+++++++>-----<<]>.>.            42 and 226
<<+++++[->>>>>+++<<<<<]>>>>>.            15
[-<<<<+>>>>]<<<<.                        moves 15 back
>>>>>>+>+>+>+>+>+<<<<<<[>]>+++++++++++++++++++++++++++++++++++++++++++++++++.   scan right then digit 1
<<[<]>.                                  scan left over the ones
+++++++[-<+++++>>+++<]<.>>.              35 and 21 at offsets on both sides
