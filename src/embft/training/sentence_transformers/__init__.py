"""sentence-transformers as a trainer backend: its losses for labelled single texts, on its own Trainer."""
