"""Steering vectors: the type, the recipe that builds one, and where they come from (contrastive, control vectors)."""
