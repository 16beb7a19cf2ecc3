A retired unit that still runs calls a unit replaced and freed after it: run with
hot 1 and sync compile and retire capacity 1 (deterministic)
Cells: c0 outer counter; c1 X over c2 Z; c3 Y over c4 V; c5 W
Iteration 1 runs none of X Y W: the outer unit O1 calls stubs for them
Iteration 2 (in O1): the X stub compiles X1 and O is recompiled: O1 is retired but kept
for its frame; X1 reaches the Z stub: X is recompiled and X1 retired (kept: its frame)
The Y stub compiles Y1; Y1 reaches the V stub: Y1 is retired while O1 still runs and
X1 has no frame: X1 may go only if nothing still calls it; but O1 does
W is compiled next (into X1's memory if X1 was freed)
Iteration 3: O1 calls X through its own site which still aims at X1
+++[
 >[>[-.]<-]
 >>[>[-.]<-]
 >>[-.]
 <<<<<-
 >+>++>+>++>+++<<<<<
]
