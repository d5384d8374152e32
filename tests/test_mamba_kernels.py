"""Adapters on Mamba projections are never skipped by the fused training kernel."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_model
from transformers.models.bamba import modeling_bamba
from transformers.models.mamba import modeling_mamba
from transformers.models.mamba2 import modeling_mamba2

from peft_lora_mixer import LoraMixerConfig

# the fused training function of each mixer, which receives out_proj.weight instead of calling out_proj
FUSED_KERNELS = {
    "mamba": (modeling_mamba, "mamba_inner_fn"),
    "mamba2": (modeling_mamba2, "mamba2_split_conv1d_scan_combined"),
    "bamba": (modeling_bamba, "mamba2_split_conv1d_scan_combined"),
}


@pytest.mark.parametrize("model_type", sorted(FUSED_KERNELS))
def test_fused_training_kernel_is_not_taken_when_out_proj_is_adapted(monkeypatch, model_type):
    calls = []

    def fused_kernel_that_ignores_adapters(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the fused kernel reads out_proj.weight and would skip the adapter")

    monkeypatch.setattr(*FUSED_KERNELS[model_type], fused_kernel_that_ignores_adapters)
    config = LoraMixerConfig(num_experts=2, r=2, lora_dropout=0.5, target_modules=["in_proj", "out_proj"])
    model = get_peft_model(tiny_model(model_type), config).train()
    ids = torch.randint(0, VOCAB, (2, 6))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # no cache: the fused path is eligible
    assert not calls
    mixer = next(m for m in model.modules() if hasattr(m, "A_log"))
    assert mixer.training and mixer.out_proj.training  # flags restored; adapters' dropout stayed in training
    assert mixer.out_proj.loramixer_B["default"].grad.abs().sum() > 0


def test_unadapted_mixer_still_uses_the_fused_kernel(monkeypatch):
    calls = []

    def fused_kernel(*args, **kwargs):
        calls.append(1)
        return None  # "no kernel": transformers falls back to the PyTorch path

    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", fused_kernel)
    model = get_peft_model(tiny_model("mamba"), LoraMixerConfig(num_experts=2, r=2, target_modules=["in_proj"]))
    ids = torch.randint(0, VOCAB, (2, 6))
    model.train()(input_ids=ids, labels=ids)
    assert len(calls) == 2  # one per layer: in_proj is called as a module on every path, no guard needed
