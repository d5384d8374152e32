"""Plug-and-play LoRA-Mixer: existing LoRA adapters become frozen experts, only the routers train.

Runs offline on a small llama built from its config: it saves three LoRA adapters with PEFT (standing in for
adapters you trained or found on the Hub), mixes them, trains the routers for a few steps, and saves the result in
both forms, printing their sizes.

    python examples/plug_and_play.py                       # tiny model, seconds on a CPU
    python examples/plug_and_play.py --hidden-size 4096 --heads 32 --kv-heads 8 --layers 2 --rank 16
                                                           # Llama-3-8B attention shapes, 2 of its 32 layers

With adapters on the Hub the same code takes their ids; a revision pins a branch, tag or commit:

    model = peft_lora_mixer.from_experts(
        base, ["org/lora-math", "org/lora-code@v1.2", "./my-local-lora",
               {"id": "org/multi", "subfolder": "medical", "revision": "abc123"}], top_k=2)
    ...train the routers, taught each sample's expert (`best_expert_labels`, or its task)...
    model.push_to_hub("me/my-router")                 # routers + the experts' pinned commits: a small upload
    PeftModel.from_pretrained(base, "me/my-router")   # fetches the experts again at those commits
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import peft_lora_mixer

EXPERTS = {  # name -> LoRA options: ranks, alphas, rsLoRA and targets may all differ
    "math": dict(lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "code": dict(lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "medical": dict(lora_alpha=32, target_modules=["q_proj", "o_proj"]),
}


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden_size,
        intermediate_size=64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def save_experts(args: argparse.Namespace, root: str) -> list[str]:
    """Three LoRA adapters saved by PEFT, as a fine-tuning run would leave them (random weights here)."""
    folders = []
    for seed, (name, options) in enumerate(EXPERTS.items()):
        base = build_base(args)
        torch.manual_seed(seed)
        lora = get_peft_model(base, LoraConfig(r=args.rank, init_lora_weights=False, **options))
        folders.append(os.path.join(root, name))
        lora.save_pretrained(folders[-1])
    return folders


def train_routers(model: PeftModel, args: argparse.Namespace, steps: int = 5, batch: int = 4) -> None:
    """A few router steps, the routers taught each sample's best expert: routers trained from the task loss alone
    can settle on wrong experts (docs/plug_and_play.md). With task labels, pass those as `router_labels` instead."""
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, args.vocab, (steps * batch, 16)).tolist()]
    experts = torch.tensor(peft_lora_mixer.best_expert_labels(model, samples, batch_size=batch))
    print(f"best expert per sample: {experts.tolist()}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for start in range(0, len(samples), batch):
        tokens = torch.tensor([sample["input_ids"] for sample in samples[start : start + batch]])
        loss = model(tokens, labels=tokens, router_labels=experts[start : start + batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def size_kib(folder: str) -> float:
    return os.path.getsize(os.path.join(folder, "adapter_model.safetensors")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        folders = save_experts(args, root)
        model = peft_lora_mixer.from_experts(build_base(args), folders, top_k=2)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{len(folders)} experts mixed; trainable parameters (routers only): {trainable:,}")
        train_routers(model, args)

        tokens = torch.randint(0, args.vocab, (2, 12))
        with torch.no_grad():
            expected = model(tokens).logits
        forms = {"with experts": dict(save_expert_weights=True), "router only": dict(save_expert_weights=False)}
        for form, option in forms.items():
            model.peft_config["default"].save_expert_weights = option["save_expert_weights"]
            folder = os.path.join(root, form.replace(" ", "-"))
            model.save_pretrained(folder)
            reloaded = PeftModel.from_pretrained(build_base(args), folder)
            with torch.no_grad():
                same = torch.equal(reloaded(tokens).logits, expected)
            print(f"{form:>12}: adapter_model.safetensors {size_kib(folder):9.1f} KiB, reloads identically: {same}")


if __name__ == "__main__":
    main()
