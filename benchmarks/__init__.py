"""Speed and memory benchmarks of LoRA-Mixer against PEFT LoRA and X-LoRA (run `python -m benchmarks --help`)."""
