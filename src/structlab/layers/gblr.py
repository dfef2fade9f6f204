"""gblr layer (being written)."""
