"""Training: the trainer's callbacks and the FlagEmbedding backend."""
