"""tsvd layer (being written)."""
