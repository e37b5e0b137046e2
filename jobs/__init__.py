"""Jobs: the Job record, its state machine, and its store in Redis (the one source of truth)."""
