"""Where an expert comes from, a Hub repository (id, revision, subfolder) or a local folder, and how it is fetched.

Parsing is kept free of torch and of any I/O so `LoraMixerConfig` can reject a malformed source the moment it is
built, long before a model is touched. Fetching has one fetcher per kind of source, each giving a local folder and
the commit it pinned; reading and checking what was fetched is `loading.py`'s job. The Hub options (token, cache
folder, offline) are arguments of the fetchers, never part of a config: a token must not reach `adapter_config.json`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

ExpertSourceLike = Union[str, dict[str, Any]]
_HUB_KEYS = {"id", "revision", "subfolder"}


class ExpertError(ValueError):
    """An adapter cannot serve as an expert. The message names the adapter (and the module when there is one)."""


@dataclass(frozen=True)
class ExpertSource:
    """One expert's location. Exactly one of `repo_id` (a Hub model repository) or `path` (a folder) is set."""

    repo_id: Optional[str] = None
    revision: Optional[str] = None
    subfolder: Optional[str] = None
    path: Optional[str] = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def label(self) -> str:
        """How errors and model cards name the expert: `org/name@rev/subfolder`, or the folder."""
        if not self.is_hub:
            return self.path
        label = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return label + (f"/{self.subfolder}" if self.subfolder else "")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as accepted by `parse` (`{"id", "revision", "subfolder"}` or `{"path"}`)."""
        if not self.is_hub:
            return {"path": self.path}
        return {"id": self.repo_id, "revision": self.revision, "subfolder": self.subfolder}

    @classmethod
    def parse(cls, source: ExpertSourceLike) -> ExpertSource:
        """Read a source as users write it.

        - `"org/name"` or `"org/name@revision"`: a Hub repository (the revision is a branch, tag or commit sha);
        - an existing folder, or a path starting with `.`, `/` or `~`: a local folder;
        - `{"id": ..., "revision": ..., "subfolder": ...}` or `{"path": ...}`.
        """
        if isinstance(source, dict):
            return cls._parse_dict(source)
        if not isinstance(source, str) or not source:
            raise ValueError(f"An expert source must be a Hub id, a folder or a dict, got {source!r}.")
        if os.path.isdir(os.path.expanduser(source)) or source.startswith((".", "/", "~")):
            return cls(path=os.path.abspath(os.path.expanduser(source)))
        repo_id, _, revision = source.partition("@")
        return cls._hub(repo_id, revision or None, None, source)

    @classmethod
    def _parse_dict(cls, source: dict[str, Any]) -> ExpertSource:
        if set(source) == {"path"}:
            return cls(path=os.path.abspath(os.path.expanduser(source["path"])))
        unknown = set(source) - _HUB_KEYS
        if "id" not in source or unknown:
            raise ValueError(
                f"An expert given as a dict needs 'id' (with optional 'revision' and 'subfolder') or only 'path'; "
                f"got keys {sorted(source)} in {source!r}."
            )
        return cls._hub(source["id"], source.get("revision"), source.get("subfolder"), source)

    @classmethod
    def _hub(cls, repo_id: str, revision: Optional[str], subfolder: Optional[str], given: Any) -> ExpertSource:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ValueError(
                f"Expert source {given!r} is neither an existing folder nor a valid Hub id ({error})."
            ) from None
        return cls(repo_id=repo_id, revision=revision, subfolder=subfolder or None)


@dataclass(frozen=True)
class HubOptions:
    """How Hub experts are fetched, as `huggingface_hub.hf_hub_download` takes it. Unset: the environment's
    (`HF_TOKEN` or the stored login, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`)."""

    token: Union[str, bool, None] = field(default=None, repr=False)
    cache_dir: Optional[str] = None
    local_files_only: bool = False


_HUB_OPTIONS: ContextVar[Optional[HubOptions]] = ContextVar("peft_lora_mixer_hub_options", default=None)


@contextmanager
def hub_options(
    *, token: Union[str, bool, None] = None, cache_dir: Optional[str] = None, local_files_only: bool = False
) -> Iterator[HubOptions]:
    """Fetch the Hub experts of the mixers built or loaded inside the block with these options.

    PEFT builds the tuner itself (`get_peft_model`, `PeftModel.from_pretrained`), so the options reach the fetchers
    through this block rather than through the config, which is saved: `from_experts(..., token=...)` uses it.
    """
    options = HubOptions(token, cache_dir, local_files_only)
    previous = _HUB_OPTIONS.set(options)
    try:
        yield options
    finally:
        _HUB_OPTIONS.reset(previous)


def current_hub_options() -> HubOptions:
    """The options of the innermost `hub_options` block, or the environment's."""
    return _HUB_OPTIONS.get() or HubOptions()


class FetchedExpert(NamedTuple):
    """An expert's files on this machine."""

    folder: str  # holds adapter_config.json and the weights
    commit: Optional[str]  # the commit sha a Hub expert resolved to; None for a local folder


class MissingFile(ExpertError):
    """A file the expert needs is absent (or not cached while offline)."""


def fetch(source: ExpertSource, hub: HubOptions, revision: Optional[str] = None) -> FetchedExpert:
    """The expert's files, by the fetcher of its kind of source; `revision` overrides a Hub source's own."""
    return fetch_from_hub(source, hub, revision) if source.is_hub else fetch_folder(source)


def fetch_folder(source: ExpertSource) -> FetchedExpert:
    """A local folder is already fetched; it only has to exist."""
    if not os.path.isdir(source.path):
        raise ExpertError(f"Expert {source.label!r}: no such folder.")
    return FetchedExpert(source.path, None)


def fetch_from_hub(source: ExpertSource, hub: HubOptions, revision: Optional[str] = None) -> FetchedExpert:
    """Download the config, resolve the commit it came from, and take the weights from that same commit (even if a
    branch moves meanwhile): safetensors, or else a pickle checkpoint, which only the reader may accept."""
    config_path = _download(source, CONFIG_NAME, revision or source.revision, hub)
    commit = _commit_of(config_path, source, hub.cache_dir)
    try:
        _download(source, SAFETENSORS_WEIGHTS_NAME, commit, hub)
    except MissingFile as no_safetensors:
        try:
            _download(source, WEIGHTS_NAME, commit, hub)
        except MissingFile:
            raise no_safetensors from None
    return FetchedExpert(os.path.dirname(config_path), commit)


def _download(source: ExpertSource, filename: str, revision: Optional[str], hub: HubOptions) -> str:
    """One file through the Hugging Face cache; errors name the source as the user wrote it."""
    label = source.label
    try:
        return hf_hub_download(
            source.repo_id,
            filename,
            subfolder=source.subfolder,
            revision=revision,
            token=hub.token,
            cache_dir=hub.cache_dir,
            local_files_only=hub.local_files_only,
        )
    except LocalEntryNotFoundError:
        raise MissingFile(
            f"Expert {label!r} cannot be resolved: {filename} is not in the local Hugging Face cache and the Hub "
            "cannot be reached (offline: HF_HUB_OFFLINE / local_files_only, or no connection). Fetch it once while "
            "online, or pass the `cache_dir` that holds it."
        ) from None
    except EntryNotFoundError:
        raise MissingFile(f"Expert {label!r}: the repository has no {filename}.") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ExpertError(f"Expert {label!r} cannot be resolved: {type(error).__name__}: {error}") from None
    except (HfHubHTTPError, OSError) as error:
        raise ExpertError(f"Expert {label!r}: fetching {filename} failed: {error}") from None


def _commit_of(fetched_path: str, source: ExpertSource, cache_dir: Optional[str]) -> str:
    """The commit sha a downloaded file belongs to: the cache stores it under `snapshots/<sha>/`."""
    snapshots = Path(cache_dir or constants.HF_HUB_CACHE, repo_folder_name(repo_id=source.repo_id, repo_type="model"))
    folder = Path(os.path.realpath(os.path.dirname(fetched_path)))  # the file itself links into blobs/
    return folder.relative_to(os.path.realpath(snapshots / "snapshots")).parts[0]
