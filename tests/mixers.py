"""Shared test helpers: tiny mixers (a model, or one layer), a padded batch, and independent references for the
gates and the RSL."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer
from torch import nn

from peft_lora_mixer import ExpertSpec, LoraMixerConfig, LoraMixerLayer

MIXER_DEFAULTS = dict(num_experts=4, top_k=2, r=4, init_weights=False)
# rank 8 and RSL weights large enough for the RSL to matter next to the task loss
RSL_DEFAULTS = dict(r=8, rsl_balance_weight=0.5, rsl_entropy_weight=0.3)


def mixer(model_type: str = "llama", dtype: torch.dtype = torch.float32, **config) -> PeftModel:
    """A tiny model with a LoRA-Mixer (4 random experts of rank 4, top-2 unless `config` says otherwise)."""
    return get_peft_model(tiny_model(model_type, dtype=dtype), LoraMixerConfig(**{**MIXER_DEFAULTS, **config}))


def save_base_and_mixer(base_dir: str, mixer_dir: str, config: LoraMixerConfig) -> PeftModel:
    """A tiny llama with its tokenizer saved in `base_dir`, and a mixer over it saved in `mixer_dir`, naming
    `base_dir` as its base model (what a model folder served or loaded by transformers holds)."""
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = get_peft_model(tiny_model("llama"), config)
    model.peft_config["default"].base_model_name_or_path = base_dir
    model.save_pretrained(mixer_dir)
    return model


def rsl_mixer(model_type: str = "llama", **config) -> PeftModel:
    """`mixer` with rank 8 and weighty RSL terms (alpha 0.5, lambda 0.3), in training mode."""
    return mixer(model_type, **{**RSL_DEFAULTS, **config}).train()


def make_layer(
    experts: Sequence[ExpertSpec],
    routing: str = "topk",
    top_k: int = 2,
    temperature: float = 0.7,
    in_features: int = 24,
    out_features: int = 20,
) -> LoraMixerLayer:
    """One mixer layer over a fresh `nn.Linear`, its experts and router random (seeded); the temperature is not 1
    by default, so that references must apply it."""
    torch.manual_seed(0)
    return LoraMixerLayer(
        nn.Linear(in_features, out_features),
        "default",
        list(experts),
        routing=routing,
        top_k=top_k,
        router_temperature=temperature,
        lora_dropout=0.0,
        init_weights=False,
    )


def reference_gates(probs: torch.Tensor, routing: str, k: int) -> torch.Tensor:
    """Top-k by stable sort (ties to the lower index), renormalised (`topk` top-1: not); straight-through for
    hard_soft."""
    if routing == "soft":
        return probs
    index = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    source = probs.detach() if routing == "hard_soft" else probs
    kept = source.gather(-1, index)
    switch = routing == "topk" and k == 1  # the kept probability itself
    hard = torch.zeros_like(probs).scatter(-1, index, kept if switch else kept / kept.sum(-1, keepdim=True))
    return hard + probs - probs.detach() if routing == "hard_soft" else hard


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two sequences of 6 tokens, the first left-padded by 2 (labels -100 there)."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


class ProbeRouters:
    """Keep every router's probabilities (with their graph) during a forward: the independent RSL computation."""

    def __init__(self):
        self.probs, self.original = [], LoraMixerLayer.router_logits

    def __enter__(self):
        def router_logits(layer, x, adapter_name):
            logits = self.original(layer, x, adapter_name)
            self.probs.append(torch.softmax(logits, dim=-1))
            return logits

        LoraMixerLayer.router_logits = router_logits
        return self

    def __exit__(self, *exc):
        LoraMixerLayer.router_logits = self.original

    def rsl(self, mask, top_k=2, alpha=0.5, lam=0.3, sign=1):
        losses = [autograd_rsl(valid_tokens(p, mask), top_k, alpha, lam, sign) for p in self.probs]
        return torch.stack(losses).mean()


def valid_tokens(probs, mask=None):
    """The probabilities of the tokens that count, as (tokens, E): padding dropped by indexing (the reference; the
    library weights padding by 0 instead)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return flat if mask is None else flat[mask.reshape(-1).bool()]


def autograd_rsl(probs, top_k, alpha, lam, sign):
    """The RSL of valid-token probabilities written out in torch, differentiated by autograd: the reference."""
    fbar = torch.zeros_like(probs).scatter(-1, probs.detach().topk(top_k, dim=-1).indices, 1.0).mean(0)
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1).mean()
    return alpha * probs.shape[-1] * (probs.mean(0) * fbar).sum() + sign * lam * entropy
