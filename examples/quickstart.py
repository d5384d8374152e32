"""LoRA-Mixer's API in a minute, offline: a tiny Llama built from a config, 4 routed experts on q/k/v/o.

Stage 1 trains each expert on its own synthetic "domain" with forced routing (`route_to`); stage 2 trains the
routers alone. Then the adapter is saved, loaded back on a fresh base model and checked to give identical logits.
This shows the calls, not the method's quality: for that, see the Routing Specialization Loss and the demo.

Stage 2's loss comes out above stage 1's, and the held-out comparison printed after it says why: stage 1 is told each
sample's domain, so every token reaches its own expert; in stage 2 the routers must guess the domain from the tokens
alone, and 30 steps on this toy do not teach them to guess it as well.
"""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import peft_lora_mixer  # noqa: F401  (registers LoRA-Mixer with PEFT)
from peft_lora_mixer import LoraMixerConfig

VOCAB, DOMAINS, SEQ = 64, 4, 16


def tiny_llama() -> AutoModelForCausalLM:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config)


def domain_batch(domain: torch.Tensor) -> torch.Tensor:
    """Domain d counts upward in steps of d + 1, modulo the vocabulary: easy to learn, different per domain."""
    start = torch.randint(0, VOCAB, (domain.shape[0], 1))
    return (start + (domain[:, None] + 1) * torch.arange(SEQ)) % VOCAB


def train(model, steps: int, forced: bool) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        domain = torch.randint(0, DOMAINS, (16,))
        ids = domain_batch(domain)
        if forced:
            with model.route_to(domain):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


@torch.no_grad()
def heldout_loss(model, forced: bool) -> float:
    """The loss on fresh samples of every domain, with forced routing or with the routers' own choice."""
    domain = torch.arange(DOMAINS).repeat_interleave(8)
    torch.manual_seed(1)
    ids = domain_batch(domain)
    if forced:
        with model.route_to(domain):
            return model(input_ids=ids, labels=ids).loss.item()
    return model(input_ids=ids, labels=ids).loss.item()


def main() -> None:
    model = get_peft_model(tiny_llama(), LoraMixerConfig(num_experts=DOMAINS, top_k=1, r=8, lora_alpha=16))
    model.print_trainable_parameters()

    model.set_trainable(routers=False, experts=True)
    print(f"stage 1 (experts, forced routing): loss {train(model, 60, forced=True):.3f}")
    model.set_trainable(routers=True, experts=False)
    print(f"stage 2 (routers only):            loss {train(model, 30, forced=False):.3f}")

    model.eval()
    forced, routed = heldout_loss(model, forced=True), heldout_loss(model, forced=False)
    print(
        f"held-out loss: {forced:.3f} with each sample sent to its domain's expert (stage 1's routing), {routed:.3f} "
        "with the routers' own choice: the gap is what the routers have not learned yet, not the experts"
    )
    ids = domain_batch(torch.arange(DOMAINS).repeat_interleave(4))
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(tiny_llama(), folder)
        same = torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    print(f"saved and reloaded: identical logits = {same}")
    if not same:
        raise SystemExit("reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
