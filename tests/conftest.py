import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network; set before huggingface_hub loads

import pytest  # noqa: E402
import torch  # noqa: E402
from fake_hub import HubCache, HubServer  # noqa: E402
from huggingface_hub.utils import _http  # noqa: E402

import peft_lora_mixer  # noqa: E402,F401  (registers LoRA-Mixer with PEFT)

# Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits slow every op many-fold.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubCache:
    """An offline Hugging Face cache in the Hub's layout, where tests place repos for huggingface_hub to resolve."""
    return HubCache.offline(tmp_path / "hf-cache", monkeypatch)


@pytest.fixture
def server() -> HubServer:
    """The Hub's HTTP API in memory; huggingface_hub's own client code runs up to the transport."""
    server = HubServer()
    _http.set_client_factory(server.client)
    yield server
    _http.set_client_factory(_http.default_client_factory)
