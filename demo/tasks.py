"""Synthetic task domains for the demo: character-level string transformations with distinct input formats.

Every sample is a prompt of `LENGTH` symbols between a domain's own brackets, followed by the answer (`LENGTH`
symbols) and an end token. Each domain writes with its own alphabet of `ALPHABET_SIZE` symbols and has its own
brackets, so every token of a sample shows its domain, as the words of a code or a legal text show theirs; the
answers differ in the operation, so each domain needs its own expert. The base model is pretrained on a plain
copy task over all the symbols, in a format of its own, which gives it the general skills the experts build on.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LENGTH = 6
ALPHABET_SIZE = 8
SYMBOLS = string.ascii_lowercase + "012345"  # 4 alphabets of 8 symbols
SPECIALS = ["<pad>", "<eos>"]
BRACKETS = "|<>[]{}()"
VOCAB = SPECIALS + list(SYMBOLS) + list(BRACKETS)
TOKEN_ID = {token: index for index, token in enumerate(VOCAB)}
PAD_ID, EOS_ID = TOKEN_ID["<pad>"], TOKEN_ID["<eos>"]


@dataclass(frozen=True)
class Domain:
    """A task: its alphabet, how its prompt is written, and what its answer is."""

    name: str
    alphabet: str
    open: str
    close: str
    operation: Callable[[str, str], str]  # (word, alphabet) -> answer

    def answer(self, word: str) -> str:
        return self.operation(word, self.alphabet)


def _alphabet(index: int) -> str:
    return SYMBOLS[index * ALPHABET_SIZE : (index + 1) * ALPHABET_SIZE]


def _shift(word: str, alphabet: str) -> str:
    return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in word)


def _mirror(word: str, alphabet: str) -> str:
    return "".join(alphabet[len(alphabet) - 1 - alphabet.index(c)] for c in word)


PRETRAIN = Domain("copy", SYMBOLS, "|", "|", lambda word, alphabet: word)
DOMAINS: tuple[Domain, ...] = (
    Domain("rotate", _alphabet(0), "<", ">", lambda word, alphabet: word[1:] + word[0]),
    Domain("shift", _alphabet(1), "[", "]", _shift),
    Domain("mirror", _alphabet(2), "(", ")", _mirror),
    Domain("unrotate", _alphabet(3), "{", "}", lambda word, alphabet: word[-1] + word[:-1]),
)


def encode(text: str) -> list[int]:
    return [TOKEN_ID[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids if i not in (PAD_ID, EOS_ID))


def prompt_text(domain: Domain, word: str) -> str:
    return f"{domain.open}{word}{domain.close}"


def random_words(alphabet: str, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(LENGTH)) for _ in range(count)]


def training_samples(domain: Domain, expert_id: int, count: int, seed: int) -> list[dict]:
    """Causal-LM samples whose loss covers the answer and the end token only (the prompt is given)."""
    samples = []
    for word in random_words(domain.alphabet, count, seed):
        prompt, answer = encode(prompt_text(domain, word)), encode(domain.answer(word)) + [EOS_ID]
        samples.append(
            {
                "input_ids": prompt + answer,
                "labels": [-100] * len(prompt) + answer,
                "attention_mask": [1] * (len(prompt) + len(answer)),
                "expert_id": expert_id,
            }
        )
    return samples


def evaluation_set(domain: Domain, count: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """Held-out prompts (token ids, all of one length) and their expected answers."""
    words = random_words(domain.alphabet, count, seed)
    return [encode(prompt_text(domain, w)) for w in words], [domain.answer(w) for w in words]
