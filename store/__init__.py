"""Where vectors and blobs go: Qdrant, object storage, the catalogue over both, and the embedding cache."""
