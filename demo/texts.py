"""Real text that every machine with this package installed has, no download: three clearly different domains.

- `code`: CPython's own standard-library modules (`Lib/*.py`);
- `licenses`: the license files installed packages ship in their `.dist-info` folders (legal English);
- `readmes`: the long descriptions of installed packages (the body of `.dist-info/METADATA`: Markdown or reST
  prose about software, with examples).

Each domain's files are sorted by name and split by file: every `HELDOUT_EVERY`-th file is held out, so the held-out
text never shares a file with the training text. Identical files (the same license text in many packages) are
kept once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

HELDOUT_EVERY = 4
MAX_CHARS_PER_FILE = 20_000  # a few huge files (torch's bundled third-party licenses) would otherwise dominate


def stdlib_modules() -> Iterator[tuple[str, str]]:
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        yield path.name, path.read_text(encoding="utf-8", errors="replace")


def license_files() -> Iterator[tuple[str, str]]:
    found = {}
    for distribution in importlib.metadata.distributions():
        for file in distribution.files or ():
            if ".dist-info" in str(file) and file.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
                path = Path(distribution.locate_file(file))
                if path.is_file():
                    found[f"{distribution.metadata['Name']}/{file.name}"] = path
    for name in sorted(found):
        yield name, found[name].read_text(encoding="utf-8", errors="replace")


def package_descriptions() -> Iterator[tuple[str, str]]:
    found = {}
    for distribution in importlib.metadata.distributions():
        body = (distribution.read_text("METADATA") or "").partition("\n\n")[2]  # past the e-mail style headers
        if body.strip():
            found[distribution.metadata["Name"]] = body
    for name in sorted(found):
        yield name, found[name]


DOMAINS: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "code": stdlib_modules,
    "licenses": license_files,
    "readmes": package_descriptions,
}


def split_documents(domain: str) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) of a domain, split by file, duplicates dropped."""
    seen, train, heldout = set(), [], []
    for _, text in DOMAINS[domain]():
        text = text[:MAX_CHARS_PER_FILE]
        digest = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
        if len(text.strip()) < 200 or digest in seen:
            continue
        seen.add(digest)
        (heldout if len(seen) % HELDOUT_EVERY == 0 else train).append(text)
    if not train or not heldout:
        raise ValueError(f"Too few {domain!r} documents on this machine for the real-model demo ({len(seen)} found).")
    return train, heldout
