"""Pieces for the tools users already run: the transformers Trainer (`trainer`), lm-evaluation-harness
(`lm_evaluation`, an optional extra imported only when used)."""
