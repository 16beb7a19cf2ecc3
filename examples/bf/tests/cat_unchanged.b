cat for the default end of input where the cell stays unchanged: clear before reading
,[.[-],]
