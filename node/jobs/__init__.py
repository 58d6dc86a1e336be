"""Jobs: the durable work that rules create and workers run."""
