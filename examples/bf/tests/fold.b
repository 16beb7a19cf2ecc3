Nested counted loops that fold to straight line code; each case prints its cells
Case 1: 5*8*7 = 280 wraps to 24 (a multiply loop inside a counted loop)
+++++[>++++++++[>+++++++<-]<-]>>.[-]<<
Case 2: seven levels of clears under counters (the benchb shape) then a marker
++[>+++[>++++[>+++++[>++++++[>+++++++[>++[-]+++<-]<-]<-]<-]<-]<-]>>>>>>.[-]>.[-]<<<<<<<
Case 3: first iteration differs: cell 1 starts at 246 so the inner guard is 0 once
>++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++<+++[>++++++++++[>+<-]<-]>.>.[-]<[-]<
Case 4: counter counts up (step plus 1): 253 becomes 3 iterations; sets and adds
---[>+++++[-]++>+++++<<+]>.>.[-]<[-]<
Case 5: a cell set inside a guarded inner loop and added to after (set then add)
>>+<<++++[>+++[>[-]+++++<-]>+<<-]>.>.[-]<[-]<
Case 6: multiplication that restores its operand (MulAdd from a cell the body changes)
++++++++++++++++++++[>++++++++++++++++++++++++++++++[>+>+<<-]>>[<<+>>-]<<<-]>>.>.[-]<[-]<[-]<
Case 7: a loop whose counter steps by 2 (never folded)
++++++[>+++[>++<-]<--]>>.[-]<<
Case 8: a nested loop over a zero counter (touches nothing)
+++[>[>+++<-]<-]>>.<<
Case 9: wrap around in every cell: 255 iterations adding 255 and a set to 255
-[>-[-]->-<<-]>.>.[-]<[-]<.

