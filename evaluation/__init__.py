"""Model evaluation on the user's own data: retrieval quality, speed, cost and index size."""
