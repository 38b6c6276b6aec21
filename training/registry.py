"""The versioned model registry.

Layout under the registry root::

    reward/
        v1/            immutable: save_pretrained() folder + metadata.json
        v2/
        CURRENT        one line, the name of the version served ("v2")
    policy/
        ...

A version folder is built in a staging folder and renamed into place in one step, and
CURRENT is replaced with os.replace(), so a crash mid-training never leaves a half-written
version or pointer: the served model stays what it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("reward", "policy")
_NAME = re.compile(r"^v(\d+)$")


class RegistryError(LookupError):
    """A version or kind that does not exist; the message says what does."""


@dataclass(frozen=True)
class Version:
    kind: str
    name: str
    path: Path
    metadata: dict[str, Any]

    @property
    def label(self) -> str:
        """How the version appears in model versions shown to Label Studio: 'reward-v3'."""
        return f"{self.kind}-{self.name}"


class Registry:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise RegistryError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
        return self.root / kind

    def versions(self, kind: str) -> list[Version]:
        """All committed versions of a kind, oldest first."""
        folder = self._kind_dir(kind)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            match = _NAME.match(child.name)
            if match and (child / "metadata.json").is_file():
                found.append((int(match.group(1)), child))
        return [self._load(kind, path) for _, path in sorted(found)]

    def get(self, kind: str, name: str) -> Version:
        path = self._kind_dir(kind) / name
        if not _NAME.match(name) or not (path / "metadata.json").is_file():
            known = ", ".join(v.name for v in self.versions(kind)) or "none yet"
            raise RegistryError(f"no {kind} version {name!r} in {self.root}; versions: {known}")
        return self._load(kind, path)

    def current(self, kind: str) -> Version | None:
        pointer = self._kind_dir(kind) / "CURRENT"
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        return self.get(kind, name) if name else None

    def named_or_current(self, kind: str, name: str | None) -> Version | None:
        """Version `name` if one is named (a RegistryError if it does not exist), else the
        current one: what a command's --reward-version or --policy-version flag means."""
        return self.get(kind, name) if name else self.current(kind)

    @contextmanager
    def stage(self, kind: str) -> Iterator[Path]:
        """A scratch folder to write a new version into; removed if never committed."""
        folder = self._kind_dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def commit(
        self, kind: str, staged: Path, metadata: dict[str, Any], promote: bool = False
    ) -> Version:
        """Move a staged folder into place as the next version, with its metadata."""
        folder = self._kind_dir(kind)
        metadata = {
            **metadata,
            "kind": kind,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        while True:
            number = 1 + max(
                (int(v.name.removeprefix("v")) for v in self.versions(kind)), default=0
            )
            name = f"v{number}"
            metadata["version"] = name
            _write_json(staged / "metadata.json", metadata)
            try:
                # rename() fails if another process took this number first: try the next one.
                os.rename(staged, folder / name)
                break
            except OSError:
                if not (folder / name).exists():
                    raise
        version = self._load(kind, folder / name)
        if promote:
            self.promote(kind, name)
        return version

    def promote(self, kind: str, name: str) -> Version:
        """Make `name` the version served; atomic for readers of CURRENT."""
        version = self.get(kind, name)
        pointer = self._kind_dir(kind) / "CURRENT"
        tmp = pointer.with_name(f".CURRENT.{os.getpid()}")
        tmp.write_text(name + "\n")
        os.replace(tmp, pointer)
        return version

    def _load(self, kind: str, path: Path) -> Version:
        metadata = json.loads((path / "metadata.json").read_text())
        return Version(kind=kind, name=path.name, path=path, metadata=metadata)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
