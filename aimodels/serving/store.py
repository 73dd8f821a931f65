"""A model store on a plain folder: immutable versions, movable aliases, verified loads.

A service never loads "the model". It loads *one exact version* of it, and it must be
able to say which one, roll back to the previous one, and refuse a damaged file.

```
root/
    digits/
        1/  2/  3/           one checkpoint folder per version (aimodels.checkpoint)
        aliases.json         {"production": 2, "staging": 3}
        last_version.json    3: the highest number ever handed out
        .lock                taken by every writer while it changes this model
        .staging-<uuid>/     a publish in progress (or killed): never read
```

Why versions are immutable. Version 3 means the same bytes forever: a log line, a
cached prediction or a bug report that says "v3" can be traced back to the weights.
So a publish never overwrites, a deleted number is never handed out again, and a
fix is a new version. Each version's manifest records the sha256 and size of every
file, when it was created, the package versions that wrote it and its evaluation
metrics (the version number is the folder name, assigned only when it goes in).

Why aliases. Clients ask for `production`, not for `3`. An alias is a pointer to a
version, like a Git branch to a commit: promoting or rolling back moves the pointer
and copies nothing. `aliases.json` is rewritten to a temporary file, flushed, then
swapped in with `os.replace`, so a reader sees the old pointers or the new ones.

Why stage, then rename. A publish writes the whole checkpoint into a hidden folder
*inside the store* (`.staging-<uuid>`, on the same disk, so a rename is possible),
flushes it, and only then takes the model's lock, picks the next number and renames
the folder to it. A rename is all-or-nothing, so `versions()` sees complete folders
only. A publish killed midway leaves a hidden folder that every reader ignores and
`cleanup()` removes; a live publish keeps its staging folder locked, so `cleanup()`
can tell a killed publish from a slow one. The locks are `flock`s: the kernel drops
them when their holder dies, so a crash never leaves the store locked. (On Linux,
renaming a folder onto an *empty* folder succeeds, so "the rename failed, someone was
first" is no test; the lock is what makes two publishers pick different numbers.)

Why checksums. `load` hashes every file and compares it with the manifest before
building a single tensor, so a truncated copy or an edited file is refused, with a
message naming the model, the version and the file.
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX file locks (Linux, macOS); the store does not run on native Windows
import json
import math
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aimodels.checkpoint import (
    IntegrityError,
    _fsync_dir,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)

__all__ = ["PAUSE_ENV", "IntegrityError", "ModelNotFoundError", "ModelStore", "StoredModel"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
ALIASES = "aliases.json"
LAST = "last_version.json"  # the highest number ever assigned, kept after a delete
# Test hook: seconds a publish sleeps after staging, before it takes the lock.
PAUSE_ENV = "AIMODELS_STORE_PAUSE_AFTER_STAGING"
PACKAGES = ("python", "torch", "numpy", "aimodels")  # their versions go into each manifest


class ModelNotFoundError(LookupError):
    """An unknown model, version or alias; the message lists what exists."""


@dataclass
class StoredModel:
    """One loaded, verified version of a model."""

    name: str
    version: int
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    manifest: dict[str, Any]
    metrics: dict[str, float]
    created: str  # ISO-8601, UTC


def _check_name(name: object, what: str = "model") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid {what} name {name!r}: expected {NAME_RULE}")
    return name


def _check_alias(alias: object) -> str:
    _check_name(alias, "alias")
    if alias == "latest" or str(alias).isdigit():
        raise ValueError(
            f"invalid alias {alias!r}: 'latest' and all-digit names are reserved for versions"
        )
    return str(alias)


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    checked = {}
    for key, value in (metrics or {}).items():
        number = isinstance(value, int | float | np.integer | np.floating)
        number = number and not isinstance(value, bool)
        if not isinstance(key, str) or not number or not math.isfinite(value):
            raise ValueError(f"metrics must map str to finite numbers, got {key!r}: {value!r}")
        checked[key] = float(value)
    return checked


def _package_versions() -> dict[str, str]:
    try:
        ours = _metadata.version("aimodels")
    except _metadata.PackageNotFoundError:
        ours = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "aimodels": ours}


def _write_json_atomically(path: Path, data: Any) -> None:
    """Write to a hidden temporary file, flush it to disk, then swap it in."""
    temp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(temp, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _flock(path: Path, timeout: float, blocking_what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`; the kernel releases it if this process dies."""
    deadline = time.monotonic() + timeout
    with open(path, "a") as file:  # closing the file releases the lock
        while not _try_lock(file.fileno()):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{blocking_what}: another process held {path} for {timeout} s")
            time.sleep(0.01)
        yield


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on `fd` if nobody else holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_leftover(path: Path) -> bool:
    """A staging folder nobody holds the lock of, a trash folder, or a temporary file."""
    if path.name.startswith(".staging-"):
        try:
            fd = os.open(path / ".lock", os.O_RDWR)  # never create it: a missing lock is dead
        except OSError:
            return True
        try:
            return _try_lock(fd)  # a live publish holds it
        finally:
            os.close(fd)
    return path.name.startswith(".trash-") or (path.name.startswith(".") and ".tmp-" in path.name)


def _version_number(name: str) -> int | None:
    """`7` for the folder name "7"; None for anything else ("07", "٧", ".staging-...")."""
    return int(name) if name.isascii() and name.isdigit() and name == str(int(name)) else None


class ModelStore:
    """Versions and aliases of named models under one folder (see the module docstring).

    `lock_timeout` bounds how long a writer waits for another writer of the same model.
    """

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"
    # ----------------------------------------------------------------------- reading

    def models(self) -> list[str]:
        """Names of the models with at least one complete version, sorted."""
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and _NAME.fullmatch(p.name) and self._versions(p.name)
        )

    def _versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name) for p in folder.iterdir()
            if _version_number(p.name) is not None and (p / "manifest.json").is_file()
        )

    def versions(self, name: str) -> list[int]:
        """The complete versions of `name`, sorted; staging and trash folders are ignored."""
        found = self._versions(_check_name(name))
        if not found:
            raise ModelNotFoundError(f"no model {name!r} in {self.root}; models: {self.models()}")
        return found

    def _aliases(self, name: str) -> dict[str, int]:
        try:
            data = json.loads((self.root / name / ALIASES).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise ValueError(f"{self.root / name / ALIASES}: expected {{alias: version}}")
        return data

    def aliases(self, name: str) -> dict[str, int]:
        """`{alias: version}` for `name`."""
        self.versions(name)  # raises for an unknown model
        return self._aliases(name)

    def resolve(self, name: str, ref: int | str) -> int:
        """The version meant by `ref`: an int, a digit string, "latest" or an alias."""
        versions = self.versions(name)
        if isinstance(ref, int) and not isinstance(ref, bool):
            version = ref
        elif isinstance(ref, str) and ref.isascii() and ref.isdigit():
            version = int(ref)
        elif ref == "latest":
            version = versions[-1]
        elif isinstance(ref, str) and ref in (aliases := self._aliases(name)):
            version = aliases[ref]
        else:
            version = None
        if version not in versions:
            raise ModelNotFoundError(
                f"model {name!r} has no version or alias {ref!r}; versions: {versions}, "
                f"aliases: {self._aliases(name)}, or 'latest'"
            )
        return version

    def path(self, name: str, version: int | str) -> Path:
        """The folder holding `name` at `version` (an int or any `resolve` reference)."""
        return self.root / name / str(self.resolve(name, version))

    def info(self, name: str, ref: int | str = "latest") -> dict[str, Any]:
        """Manifest-level facts about a version, without hashing or loading the weights."""
        version = self.resolve(name, ref)
        folder = self.root / name / str(version)
        manifest = read_manifest(folder)
        meta = manifest["metadata"]
        return {
            "name": name, "version": version, "created": meta.get("created", ""),
            "metrics": json.loads(meta.get("metrics", "{}")),
            "packages": {key: meta[key] for key in PACKAGES if key in meta},
            "files": manifest["files"], "path": str(folder),
            "aliases": sorted(a for a, v in self._aliases(name).items() if v == version),
        }

    def load(self, name: str, ref: int | str = "production") -> StoredModel:
        """Verify every file's checksum, then return the version's tensors and config."""
        version = self.resolve(name, ref)
        folder = self.root / name / str(version)
        try:
            manifest = read_manifest(folder)
            tensors, config = load_checkpoint(folder)
        except FileNotFoundError:  # deleted since resolve()
            raise ModelNotFoundError(f"model {name!r} version {version} was just deleted") from None
        except IntegrityError as exc:
            raise IntegrityError(
                f"model {name!r} version {version} ({folder}) failed verification: {exc}"
            ) from exc
        meta = manifest["metadata"]
        return StoredModel(name, version, tensors, config, manifest,
                           json.loads(meta.get("metrics", "{}")), meta.get("created", ""))

    # ----------------------------------------------------------------------- writing

    def _lock(self, name: str, what: str) -> contextlib.AbstractContextManager[None]:
        return _flock(self.root / name / ".lock", self.lock_timeout, f"{what} {name!r}")

    def publish(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        extra_files: Mapping[str, bytes | str] | None = None,
        aliases: Iterable[str] = (),
    ) -> int:
        """Store a new version of `name` and return its number (1, 2, ...).

        The files are written and flushed before the lock is taken; under the lock the
        next number is chosen, the folder renamed to it, then `aliases` point at it.
        The environment variable AIMODELS_STORE_PAUSE_AFTER_STAGING (seconds) makes it
        sleep between the two, so a test can kill a publish at a known point.
        """
        folder = self.root / _check_name(name)
        aliases = [_check_alias(a) for a in aliases]
        metadata = {
            "name": name,
            "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "metrics": json.dumps(_check_metrics(metrics), sort_keys=True),
            **_package_versions(),
        }
        folder.mkdir(exist_ok=True)
        with self._lock(name, "publish"):  # so cleanup() never sees a staging folder unlocked
            staging = folder / f".staging-{uuid.uuid4().hex}"
            staging.mkdir()
            owner = open(staging / ".lock", "a")  # locked until the publish ends or dies
            fcntl.flock(owner.fileno(), fcntl.LOCK_EX)
        try:
            save_checkpoint(staging / "checkpoint", tensors, config,
                            extra_files=extra_files, metadata=metadata)
            time.sleep(float(os.environ.get(PAUSE_ENV, "0")))
            with self._lock(name, "publish"):
                version = self._next_version(name)
                os.rename(staging / "checkpoint", folder / str(version))
                _fsync_dir(folder)
                _write_json_atomically(folder / LAST, version)
                for alias in aliases:
                    self._set_alias_locked(name, alias, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            owner.close()
        return version

    def _next_version(self, name: str) -> int:
        """One more than any number ever used, so a deleted version's number is not reused."""
        folder = self.root / name
        used = [v for p in folder.iterdir() if (v := _version_number(p.name)) is not None]
        with contextlib.suppress(FileNotFoundError):
            used.append(int(json.loads((folder / LAST).read_text())))
        return max(used, default=0) + 1  # counts empty digit folders too: never rename onto one

    def _set_alias_locked(self, name: str, alias: str, version: int) -> None:
        aliases = self._aliases(name)
        aliases[alias] = version
        _write_json_atomically(self.root / name / ALIASES, aliases)

    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        """Point `alias` at `version` (any `resolve` reference), replacing it atomically."""
        alias = _check_alias(alias)
        self.versions(name)
        with self._lock(name, "set_alias on"):
            self._set_alias_locked(name, alias, self.resolve(name, version))

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove `alias`; an unknown alias raises `ModelNotFoundError`."""
        self.versions(name)
        with self._lock(name, "remove_alias on"):
            aliases = self._aliases(name)
            if alias not in aliases:
                raise ModelNotFoundError(f"model {name!r} has no alias {alias!r}: {aliases}")
            del aliases[alias]
            _write_json_atomically(self.root / name / ALIASES, aliases)

    def delete(self, name: str, version: int | str) -> None:
        """Delete a version no alias points at: rename it out of sight, then remove it."""
        self.versions(name)
        with self._lock(name, "delete"):
            version = self.resolve(name, version)
            pointing = sorted(a for a, v in self._aliases(name).items() if v == version)
            if pointing:
                raise ValueError(
                    f"cannot delete {name!r} version {version}: alias(es) {pointing} point at "
                    "it; move or remove them first"
                )
            trash = self.root / name / f".trash-{version}-{uuid.uuid4().hex[:8]}"
            os.rename(self.root / name / str(version), trash)
            _fsync_dir(self.root / name)
        shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self) -> list[Path]:
        """Remove what killed publishes and deletes left behind; return the removed paths.

        A staging folder whose owner is still alive holds a lock and is left alone.
        """
        removed = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not _NAME.fullmatch(folder.name):
                continue
            with self._lock(folder.name, "cleanup"):
                for path in sorted(p for p in folder.iterdir() if _is_leftover(p)):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed.append(path)
        return removed
