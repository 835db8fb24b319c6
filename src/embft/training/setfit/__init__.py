"""SetFit as a trainer backend: its own Trainer with its defaults (pairs, CosineSimilarityLoss, a head)."""
