"""Tracking: MLflow runs and hashes, study parent runs, the registry, serving and the kNN classifier, MLflow names."""
