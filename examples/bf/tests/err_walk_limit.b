An unbalanced loop inside a loop walks right into the tape limit
++[>+[>+]<<-]
