"""Where vectors and blobs go: Qdrant, object storage, the embedding cache (upcoming)."""
