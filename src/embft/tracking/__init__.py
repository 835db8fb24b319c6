"""Tracking: MLflow runs and hashes, study parent runs, the registry, MLflow names."""
