"""Plug-and-play benchmark on tasks generated from the Python standard library, or given as JSONL files."""
