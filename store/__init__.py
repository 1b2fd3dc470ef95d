"""Where vectors and blobs go: Qdrant (``vectors``), object storage (``objects``), the catalogue
over both (``catalog``), the content-hash embedding cache (``cache``), and which named vectors the
served models give an item (``spaces``). Configured by the small typed configs in ``config``."""
