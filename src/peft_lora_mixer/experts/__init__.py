"""Experts from existing adapters: where they come from (Hub ids, folders), how they are read and checked against
the base model, how a mixer of them is saved (pinned references) and described (model card), and `from_experts`."""
