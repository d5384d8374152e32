"""An offline stand-in for the Hugging Face Hub, so huggingface_hub's real resolution and upload code runs in tests.

- `HubCache` lays repositories out in a Hugging Face cache exactly as downloads would
  (`models--org--name/{blobs/<hash>, snapshots/<sha>/<file> -> ../../blobs/<hash>, refs/<name>}`).
- `HubServer` answers in memory the HTTP requests of file downloads (resolve) and of `push_to_hub` (create repo,
  read the card, validate it, pre-upload, commit), recording requests and committed files; nothing leaves the
  machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import _http


class HubCache:
    """A Hugging Face cache directory that tests fill with repositories."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def offline(cls, root: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
        """An empty cache at `root` that huggingface_hub resolves every id from, offline, for one test."""
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import by huggingface_hub
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
        return cls(root)

    def publish(self, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
        """Store one commit of `repo_id` holding `files` (path in repo -> content); returns its sha."""
        digest = hashlib.sha1(repo_id.encode())
        for path, content in sorted(files.items()):
            digest.update(path.encode() + content)
        sha = digest.hexdigest()
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        for path, content in files.items():
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(content)
            link = repo / "snapshots" / sha / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        for ref in refs:
            (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
            (repo / "refs" / ref).write_text(sha)
        return sha

    def publish_folder(self, repo_id: str, folder: str, subfolder: Optional[str] = None, **kwargs) -> str:
        """Publish every file of a local folder (optionally under `subfolder` in the repository)."""
        prefix = f"{subfolder}/" if subfolder else ""
        files = {prefix + name: Path(folder, name).read_bytes() for name in os.listdir(folder)}
        return self.publish(repo_id, files, **kwargs)


class HubServer:
    """The Hub's HTTP API, as far as file downloads and `push_to_hub` use it, answering from memory."""

    def __init__(self):
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}  # repo id -> (commit sha, files) at `main`
        self.commits: dict[str, list[dict[str, bytes]]] = {}
        self.requests: list[httpx2.Request] = []
        self.unexpected: list[str] = []

    def serve(self, repo_id: str, folder: str) -> str:
        """Make the files of `folder` downloadable as `repo_id` at `main`; returns the commit sha."""
        files = {name: Path(folder, name).read_bytes() for name in os.listdir(folder)}
        sha = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.repos[repo_id] = (sha, files)
        return sha

    def client(self) -> httpx2.Client:
        return httpx2.Client(
            transport=httpx2.MockTransport(self.handle),
            event_hooks={"request": [_http.hf_request_event_hook]},
            follow_redirects=True,
        )

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if "/resolve/" in path:
            return self._resolve(request)
        if request.method == "POST" and path == "/api/repos/create":
            name = json.loads(request.content)
            repo_id = f"{name['organization']}/{name['name']}" if name.get("organization") else name["name"]
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}", "name": repo_id})
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry: unavailable, so nothing is cached
            return httpx2.Response(503)
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if request.method == "POST" and "/preupload/" in path:
            files = json.loads(request.content)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": answer})
        if request.method == "POST" and "/commit/" in path:
            repo_id = path.removeprefix("/api/models/").split("/commit/")[0]
            lines = [json.loads(line) for line in request.read().splitlines() if line]
            files = {
                item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines
                if item["key"] == "file"
            }
            self.commits.setdefault(repo_id, []).append(files)
            oid = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
            return httpx2.Response(
                200, json={"commitUrl": f"https://huggingface.co/{repo_id}/commit/{oid}", "commitOid": oid}
            )
        self.unexpected.append(f"{request.method} {request.url}")
        return httpx2.Response(500, json={"error": "unexpected request in test"})

    def _resolve(self, request: httpx2.Request) -> httpx2.Response:
        repo_id, _, rest = request.url.path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        sha, files = self.repos.get(repo_id, (None, {}))
        if filename not in files or revision not in ("main", sha):
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "not found"})
        content = files[filename]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
            "Content-Length": str(len(content)),
        }
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else content)
