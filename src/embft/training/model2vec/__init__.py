"""train.backend=model2vec: a static-embedding model distilled from the base model, fine-tuned on the labelled texts."""
