Multiplication that restores its operand: the inner MulAdd reads a cell the body changes
+++[>++[>+>+<<-]>>[<<+>>-]<<<-]
