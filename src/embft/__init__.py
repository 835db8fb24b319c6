"""embft: fine-tune text-embedding models for classification and measure what each setting does."""

__version__ = "0.1.0"
