"""Parsers of what users send or point at: model sources, adapter sources, archives, documents, datasets, GGUF headers."""
