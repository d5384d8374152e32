"""Pieces for the training engines users already run (the transformers Trainer)."""
