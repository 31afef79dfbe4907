"""The files cml-rs writes: versioned ``.npz`` archives with JSON metadata.

No pickle is ever written or read. A file is written to a temporary name
beside its target and renamed over it, so a crash never leaves half a file;
reading checks the format name and version before anything is trusted.
Models (:mod:`cml_rs.model`) and splits (:mod:`cml_rs.datasets`) use these.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import IO, Any, Union

import numpy as np

__all__ = ["PathOrFile", "load_npz", "npz_path", "save_npz"]

PathOrFile = Union[str, os.PathLike, IO[bytes]]


def npz_path(path: str | os.PathLike) -> Path:
    """``path`` with ``.npz`` added when it has no suffix (as numpy and implicit do)."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".npz")


def _is_file(target: Any) -> bool:
    return hasattr(target, "write") or hasattr(target, "read")


def save_npz(target: PathOrFile, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Writes ``arrays`` and ``meta`` (as the ``meta`` member) to a path, atomically, or to
    an open binary file (at its current position)."""
    members = {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    if _is_file(target):
        np.savez(target, **members)
        return
    path = npz_path(target)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **members)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_npz(
    source: PathOrFile, expected_format: str, max_version: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and JSON metadata of an npz file of ours (a path, or an open binary file),
    or a clear ValueError. A path without suffix that does not exist is tried with ``.npz``."""
    if _is_file(source):
        path: Any = getattr(source, "name", "the file object")
        arrays = _read_members(source, path)
    else:
        path = Path(source)
        if not path.exists() and not path.suffix:
            path = npz_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        # Open the file ourselves: np.load leaves its own handle open when the
        # archive turns out to be damaged.
        with open(path, "rb") as handle:
            arrays = _read_members(handle, path)
    if "meta" not in arrays:
        raise ValueError(f"{path} has no metadata; it was not written by cml-rs")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable metadata ({error}); the file is damaged") from None
    if meta.get("format") != expected_format:
        raise ValueError(f"{path} holds a {meta.get('format')!r} file, expected {expected_format!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version > max_version:
        raise ValueError(
            f"{path} was written by format version {version}; this cml-rs reads up to {max_version} (upgrade cml-rs)"
        )
    return arrays, meta


def _read_members(handle: IO[bytes], path: Any) -> dict[str, np.ndarray]:
    try:
        with np.load(handle, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path} is not a readable cml-rs file (truncated or corrupted?): {error}") from None
