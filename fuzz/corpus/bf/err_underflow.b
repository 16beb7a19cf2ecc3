start
<+
