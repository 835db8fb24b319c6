"""Serving: the logged classifier's code (classifier.py, logged as "model from code"), logging a job's
models with their support set (models.py), and the `embft predict` command (predict.py)."""
