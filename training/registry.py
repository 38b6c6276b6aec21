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
version or pointer: the served model stays what it was. A write that fails (a full disk)
removes what it staged and raises `RegistryWriteError`; CURRENT is not touched.

Each promotion is also appended to PROMOTED (one name a line). A damaged registry (CURRENT
naming a missing folder, a version without weights or with unreadable metadata) does not
stop serving: `current()` falls back to the last good version promoted before (the newest
intact older version where PROMOTED is missing), and `problems()` says what is wrong.

Several Label Studio projects on one backend each get their own lineage, a registry of the
same layout: `lineage(root, project_id)` (docs/deployment.md, "Several projects").
"""

from __future__ import annotations

import errno
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
# What save_pretrained() writes as weights; a version folder without one cannot be served.
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
PROJECTS_DIR = "projects"
OWNER_FILE = "PROJECT"


class RegistryError(LookupError):
    """A version or kind that does not exist; the message says what does."""


class RegistryWriteError(OSError):
    """Saving a version or a pointer failed (a full disk, say); nothing was changed."""


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

    def _folders(self, kind: str) -> list[tuple[int, Path]]:
        """Committed version folders (vN) of a kind, oldest first, intact or not."""
        folder = self._kind_dir(kind)
        if not folder.is_dir():
            return []
        return sorted(
            (int(match.group(1)), child)
            for child in folder.iterdir()
            if (match := _NAME.match(child.name)) and child.is_dir()
        )

    def versions(self, kind: str) -> list[Version]:
        """All intact versions of a kind, oldest first (`damaged()` lists the others)."""
        found = []
        for _, path in self._folders(kind):
            version = self._read(kind, path)
            if isinstance(version, Version):
                found.append(version)
        return found

    def damaged(self, kind: str) -> dict[str, str]:
        """Version folders that cannot be served: {name: what is wrong}."""
        return {
            path.name: problem
            for _, path in self._folders(kind)
            if isinstance(problem := self._read(kind, path), str)
        }

    def get(self, kind: str, name: str) -> Version:
        path = self._kind_dir(kind) / name
        found = self._read(kind, path) if _NAME.match(name) and path.is_dir() else None
        if isinstance(found, Version):
            return found
        known = ", ".join(v.name for v in self.versions(kind)) or "none yet"
        what = f"is damaged ({found})" if isinstance(found, str) else "does not exist"
        raise RegistryError(f"{kind} version {name!r} in {self.root} {what}; versions: {known}")

    def pointer(self, kind: str) -> str | None:
        """The name CURRENT holds, as written (None without a CURRENT)."""
        pointer = self._kind_dir(kind) / "CURRENT"
        try:
            return pointer.read_text().strip() or None
        except FileNotFoundError:
            return None

    def current(self, kind: str) -> Version | None:
        """The version served: the one CURRENT names, or, if that one is missing or
        damaged, the last good one before it (`problems()` says so)."""
        name = self.pointer(kind)
        if name is None:
            return None
        try:
            return self.get(kind, name)
        except RegistryError:
            return self._last_good(kind, name)

    def _last_good(self, kind: str, broken: str) -> Version | None:
        intact = {v.name: v for v in self.versions(kind)}
        history = self._kind_dir(kind) / "PROMOTED"
        if history.is_file():
            for name in reversed(history.read_text().split()):
                if name != broken and name in intact:
                    return intact[name]
            return None
        # A registry from before PROMOTED: the newest intact version older than the broken one.
        match = _NAME.match(broken)
        limit = int(match.group(1)) if match else None
        older = [v for v in intact.values() if limit is None or int(v.name[1:]) < limit]
        return max(older, key=lambda v: int(v.name[1:]), default=None)

    def problems(self) -> list[str]:
        """What is wrong in this registry, one line each, naming no folder on disk."""
        lines = []
        for kind in KINDS:
            damaged = self.damaged(kind)
            for name, problem in damaged.items():
                lines.append(f"{kind}-{name} is damaged ({problem}): it is never served")
            pointed = self.pointer(kind)
            if pointed is None:
                continue
            name = pointed
            try:
                self.get(kind, name)
            except RegistryError:
                fallback = self._last_good(kind, name)
                what = f"damaged ({damaged[name]})" if name in damaged else "missing"
                lines.append(
                    f"{kind}/CURRENT names {name!r}, which is {what}: serving "
                    + (fallback.label if fallback else f"no {kind} version")
                    + " instead (`ls-rlhf versions pin` chooses another)"
                )
        return lines

    def named_or_current(self, kind: str, name: str | None) -> Version | None:
        """Version `name` if one is named (a RegistryError if it does not exist), else the
        current one: what a command's --reward-version or --policy-version flag means."""
        return self.get(kind, name) if name else self.current(kind)

    @contextmanager
    def stage(self, kind: str) -> Iterator[Path]:
        """A scratch folder to write a new version into; removed if never committed."""
        folder = self._kind_dir(kind)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        except OSError as err:
            raise _write_error(err, kind) from err
        try:
            yield staging
        except RegistryWriteError:
            raise
        except Exception as err:
            # A full disk mid-save_pretrained(): the half-written folder goes (finally below).
            code = _disk_errno(err)
            if code is None:
                raise
            raise _write_error(OSError(code, os.strerror(code)), kind) from err
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
            try:
                _write_json(staged / "metadata.json", metadata)
            except OSError as err:
                raise _write_error(err, kind) from err
            try:
                # rename() fails if another process took this number first: try the next one.
                os.rename(staged, folder / name)
                break
            except OSError as err:
                if not (folder / name).exists():
                    raise _write_error(err, kind) from err
        version = self._load(kind, folder / name)
        if promote:
            self.promote(kind, name)
        return version

    def promote(self, kind: str, name: str) -> Version:
        """Make `name` the version served; atomic for readers of CURRENT."""
        version = self.get(kind, name)
        pointer = self._kind_dir(kind) / "CURRENT"
        tmp = pointer.with_name(f".CURRENT.{os.getpid()}")
        try:
            # History first: a promotion that cannot be recorded does not happen.
            with open(pointer.with_name("PROMOTED"), "a") as history:
                history.write(name + "\n")
            tmp.write_text(name + "\n")
            os.replace(tmp, pointer)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise _write_error(err, kind, promoting=name) from err
        return version

    def _read(self, kind: str, path: Path) -> Version | str:
        """The version in `path`, or what is wrong with it."""
        try:
            metadata = json.loads((path / "metadata.json").read_text())
        except FileNotFoundError:
            return "no metadata.json"
        except (OSError, ValueError) as err:
            return f"metadata.json unreadable: {type(err).__name__}"
        if not isinstance(metadata, dict):
            return "metadata.json is not a JSON object"
        if not any(next(path.glob(pattern), None) for pattern in _WEIGHTS):
            return "no weights file"
        return Version(kind=kind, name=path.name, path=path, metadata=metadata)

    def _load(self, kind: str, path: Path) -> Version:
        found = self._read(kind, path)
        if isinstance(found, str):
            raise RegistryError(f"{kind} version {path.name!r} in {self.root} is damaged: {found}")
        return found


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _disk_errno(err: BaseException) -> int | None:
    """The errno of a failed write, also where a library wraps it in its own exception
    (safetensors raises SafetensorError "... (os error 28)" on a full disk)."""
    if isinstance(err, OSError):
        return err.errno if err.errno in _DISK_ERRORS else None
    text = str(err)
    for code in _DISK_ERRORS:
        if f"(os error {code})" in text or os.strerror(code) in text:
            return code
    return None


def _write_error(err: OSError, kind: str, promoting: str | None = None) -> RegistryWriteError:
    reason = os.strerror(err.errno) if err.errno else type(err).__name__
    what = f"promoting {kind}-{promoting}" if promoting else f"saving a new {kind} version"
    return RegistryWriteError(
        err.errno or 0,
        f"the model registry could not be written ({reason}) while {what}: nothing was "
        f"saved and the served {kind} version is unchanged; free disk space (or fix the "
        "folder's permissions) and train again",
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def lineage(root: str | os.PathLike[str], project_id: int | None, claim: bool = False) -> Registry:
    """The registry holding project `project_id`'s reward and policy versions.

    The registry root is the lineage of one project, its owner: the project named in the
    root's PROJECT file, else the project its reward versions were trained on (a registry
    from before projects had lineages), else, with `claim`, the first project that connects
    (its /setup or /predict), which writes PROJECT. Every other project's lineage is
    `projects/<id>/` under the root, empty until its first training: it serves the base
    policy and no reward model. `project_id` None (the CLI without --project, a request
    without a project) means the root.
    """
    base = Registry(root)
    if project_id is None:
        return base
    own = base.root / PROJECTS_DIR / str(project_id)
    if own.is_dir():
        return Registry(own)
    owner = owner_of(base)
    if owner is None and claim:
        owner = _claim(base, project_id)
    return base if owner in (None, project_id) else Registry(own)


def owner_of(registry: Registry) -> int | None:
    """The project whose lineage the registry root is, if any yet."""
    try:
        text = (registry.root / OWNER_FILE).read_text().strip()
        return int(text) if text.isdigit() else None
    except FileNotFoundError:
        pass
    for version in reversed(registry.versions("reward")):
        source = (version.metadata.get("data") or {}).get("source", "")
        match = re.fullmatch(r"project (\d+)", str(source))
        if match:
            return int(match.group(1))
    return None


def _claim(registry: Registry, project_id: int) -> int:
    """Record `project_id` as the root's owner unless another process was first."""
    registry.root.mkdir(parents=True, exist_ok=True)
    path = registry.root / OWNER_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return owner_of(registry) or project_id
    with os.fdopen(fd, "w") as out:
        out.write(f"{project_id}\n")
    return project_id


def lineages(root: str | os.PathLike[str]) -> dict[int | None, Registry]:
    """Every lineage under a registry root: {owner or None: the root, project id: its own}."""
    base = Registry(root)
    found: dict[int | None, Registry] = {owner_of(base): base}
    projects = base.root / PROJECTS_DIR
    if projects.is_dir():
        for child in sorted(projects.iterdir(), key=lambda p: p.name.zfill(20)):
            if child.name.isdigit():
                found[int(child.name)] = Registry(child)
    return found
