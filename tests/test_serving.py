"""`transformers serve` serves a LoRA-Mixer from the folder `lora-mixer export --serving` writes, as it serves a
plain LoRA: concurrent greedy `/v1/completions`, and a `/v1/chat/completions` request (what chat clients send),
answer what `generate` answers in-process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mixers import save_base_and_mixer
from peft import PeftModel
from test_autoregister import PTH, ROOT
from tiny_tokenizer import tiny_tokenizer, word
from transformers import AutoModelForCausalLM

from peft_lora_mixer import LoraMixerConfig
from peft_lora_mixer.cli.commands import main

pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving]")
pytest.importorskip("uvicorn", reason="transformers serve needs transformers[serving]")

PROMPTS = [" ".join(word(start + i) for i in range(4)) for start in (0, 17, 40, 63, 90)]
MAX_TOKENS = 6
START_TIMEOUT_S = 180  # loading transformers and the model on a busy 2-core machine
REQUEST_TIMEOUT_S = 120

# `transformers serve` in a process that reads our .pth as site-packages would and never imports us itself
SERVE = """
import os, site, sys
site.addsitedir(os.environ["SITE_DIR"])
from transformers.cli.transformers import main

sys.argv = ["transformers", "serve", *sys.argv[1:]]
sys.exit(main())
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """A base model with its tokenizer, a mixer over it, and the serving folder exported from the two."""
    root = tmp_path_factory.mktemp("serving")
    paths = {name: str(root / name) for name in ("base", "mixer", "served", "site")}
    config = LoraMixerConfig(num_experts=3, r=4, lora_alpha=16, init_weights=False)
    save_base_and_mixer(paths["base"], paths["mixer"], config)
    assert (
        main(["export", "--serving", "--base", paths["base"], "--mixer", paths["mixer"], "--output", paths["served"]])
        == 0
    )
    # the tiny tokenizer has no chat template; this one sends a message's text as it is, so a chat request's
    # answer is the completion of that text
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    tokenizer.save_pretrained(paths["served"])
    os.mkdir(paths["site"])
    (root / "site" / PTH).write_text((ROOT / "src" / PTH).read_text())
    return paths


@torch.no_grad()
def generated(model, prompt: str) -> str:
    """The greedy continuation of `prompt`, decoded as the server decodes it."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[-1] :], skip_special_tokens=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def wait_until_up(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"transformers serve exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise AssertionError(f"transformers serve did not answer within {START_TIMEOUT_S} s")


@contextmanager
def server_of(folders: dict[str, str], continuous_batching: bool, log: Path) -> Iterator[str]:
    """`transformers serve` on the exported folder, on a free port; yields its URL, stops it in every case."""
    port = free_port()
    batching = "--continuous-batching" if continuous_batching else "--no-continuous-batching"
    command = [sys.executable, "-c", SERVE, folders["served"], "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "SITE_DIR": folders["site"], "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    with log.open("w") as output:
        server = subprocess.Popen([*command, "--device", "cpu", batching], env=env, stdout=output, stderr=output)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(server, url, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def expected_answers(folders: dict[str, str]) -> list[str]:
    base = AutoModelForCausalLM.from_pretrained(folders["base"]).eval()
    unadapted = [generated(base, prompt) for prompt in PROMPTS]
    mixer = PeftModel.from_pretrained(base, folders["mixer"]).eval()
    expected = [generated(mixer, prompt) for prompt in PROMPTS]
    assert expected != unadapted  # the server must apply the mixer to match
    return expected


@pytest.mark.slow  # a server start: 15 to 40 s on a busy 2-core machine
@pytest.mark.parametrize("continuous_batching", [False, True], ids=["plain", "continuous-batching"])
def test_concurrent_completions_equal_generate(folders, continuous_batching, tmp_path):
    expected = expected_answers(folders)
    with server_of(folders, continuous_batching, tmp_path / "server.log") as url:
        body = {"model": folders["served"], "max_tokens": MAX_TOKENS, "temperature": 0}
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda prompt: post(f"{url}/v1/completions", {**body, "prompt": prompt}), PROMPTS))
    assert [answer["choices"][0]["text"] for answer in answers] == expected


@pytest.mark.slow  # a server start
def test_chat_completion_equals_generate(folders, tmp_path):
    expected = expected_answers(folders)
    with server_of(folders, False, tmp_path / "server.log") as url:
        messages = [{"role": "user", "content": PROMPTS[1]}]
        body = {"model": folders["served"], "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        answer = post(f"{url}/v1/chat/completions", body)
    assert answer["choices"][0]["message"]["content"] == expected[1]
