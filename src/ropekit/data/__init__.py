"""Inputs shared by evaluation and training: long documents, read and tokenised (cached)."""
