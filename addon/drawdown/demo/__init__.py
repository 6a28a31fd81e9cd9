"""`drawdown demo`: a runaway agent (official openai SDK) stopped by its run budget."""
