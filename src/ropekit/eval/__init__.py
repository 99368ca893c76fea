"""Evaluate long-context ability: perplexity (three named conventions), passkey retrieval."""
