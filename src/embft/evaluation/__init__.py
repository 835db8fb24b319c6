"""Evaluation: the MTEB classification task over a job's splits and the baseline cache."""
