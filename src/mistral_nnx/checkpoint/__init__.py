"""Checkpoint readers, name maps and placement; see loader.load_model."""
