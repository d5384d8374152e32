"""LoRA-Mixer on a Mamba model, offline: routed experts on the SSM's in_proj and out_proj.

A tiny Mamba built from its config; the default targets for `model_type="mamba"` are in_proj and out_proj. The
script trains experts and routers jointly for a few steps (the RSL is added to the loss while training), checks
that greedy generation with the SSM cache equals generation without it, and saves and reloads the adapter.

    python examples/mamba.py

Note: in training, transformers' Mamba mixers hand out_proj.weight to a fused kernel when one is installed (CUDA),
which would skip an adapter there. LoRA-Mixer makes a mixer with an adapted out_proj take its non-fused path, so
the adapter always acts; see the README.
"""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import MambaConfig, MambaForCausalLM

from peft_lora_mixer import LoraMixerConfig


def tiny_mamba() -> MambaForCausalLM:
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=256, hidden_size=64, state_size=8, num_hidden_layers=2))


def main() -> None:
    model = get_peft_model(tiny_mamba(), LoraMixerConfig(num_experts=4, top_k=2, r=8, lora_alpha=16))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss  # task loss + Routing Specialization Loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"loss after 20 steps: {loss.item():.3f}; routing loss parts: {model.routing_loss()}")

    model.eval().requires_grad_(False)  # frozen for inference, like the reloaded copy below
    prompt, settings = ids[:2, :8], dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **settings)
        uncached = model.generate(input_ids=prompt, use_cache=False, **settings)
    print(f"greedy generation with the SSM cache equals without it: {torch.equal(cached, uncached)}")

    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(tiny_mamba(), folder)
        same = torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # (Mamba's CPU path rounds differently when weights require grad, so compare two frozen models.)
    print(f"saved and reloaded: identical logits = {same}")
    if not same:
        raise SystemExit("reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
