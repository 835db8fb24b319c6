"""FlagEmbedding's EncoderOnlyEmbedderRunner: arguments, the groupwise loss, torchrun, training and saving."""
