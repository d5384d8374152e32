"""BIG-bench plug-and-play benchmark: per-task LoRA experts combined by LoRA-Mixer, PEFT merges, Arrow and X-LoRA."""
