"""Where an expert comes from: a Hub repository (id, revision, subfolder) or a local folder.

Parsing is kept free of torch and of any I/O so `LoraMixerConfig` can reject a malformed source the moment it is
built, long before a model is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

from huggingface_hub.utils import HFValidationError, validate_repo_id

ExpertSourceLike = Union[str, dict[str, Any]]
_HUB_KEYS = {"id", "revision", "subfolder"}


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
