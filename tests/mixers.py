"""Shared test helpers: a tiny mixer in training mode, a padded batch, and the RSL computed independently."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_model

from peft_lora_mixer import LoraMixerConfig, LoraMixerLayer
from peft_lora_mixer.routing_loss.loss import valid_tokens

RSL_DEFAULTS = dict(num_experts=4, top_k=2, init_weights=False, rsl_balance_weight=0.5, rsl_entropy_weight=0.3)


def mixer(model_type: str = "llama", **config) -> PeftModel:
    """A tiny model with a 4-expert top-2 mixer whose RSL weights are large enough to matter, in training mode."""
    model = get_peft_model(tiny_model(model_type), LoraMixerConfig(**{**RSL_DEFAULTS, **config}))
    return model.train()


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


def autograd_rsl(probs, top_k, alpha, lam, sign):
    """The RSL of valid-token probabilities written out in torch, differentiated by autograd: the reference."""
    fbar = torch.zeros_like(probs).scatter(-1, probs.detach().topk(top_k, dim=-1).indices, 1.0).mean(0)
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1).mean()
    return alpha * probs.shape[-1] * (probs.mean(0) * fbar).sum() + sign * lam * entropy


