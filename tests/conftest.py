import pytest
import torch

import peft_lora_mixer  # noqa: F401  (registers LoRA-Mixer with PEFT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
