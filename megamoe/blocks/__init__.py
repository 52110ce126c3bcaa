"""Shared building blocks with no model-family knowledge: norms, (next) the context,
attention masks and embeddings."""
