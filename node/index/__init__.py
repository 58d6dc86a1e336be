"""Stage 2: the SQL index of what the node holds."""
