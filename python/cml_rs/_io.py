"""The files cml-rs writes: versioned ``.npz`` archives with JSON metadata.

No pickle is ever written or read. A file is written to a temporary name
beside its target and renamed over it, so a crash never leaves half a file;
the temporaries of saves that were killed are removed by the next save of
the same target. Reading trusts nothing in the file: only regular files are
opened, the metadata's format and version are checked first, only the
members the format defines are read, and each member's shape and dtype (from
its npy header) and declared size are checked against what the metadata
implies before any memory is allocated for it. Models (:mod:`cml_rs.model`)
and splits (:mod:`cml_rs.datasets`) use these.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Union

import numpy as np

__all__ = ["NpzReader", "PathOrFile", "npz_path", "open_npz", "save_npz"]

PathOrFile = Union[str, os.PathLike, IO[bytes]]

#: What zipfile and zlib raise on a damaged archive or member, besides BadZipFile.
ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    OverflowError,
    SyntaxError,
    tokenize.TokenError,
)

#: Largest JSON metadata member read (a model's history is the bulk of it).
MAX_META_BYTES = 64 << 20
#: Deflate cannot expand data by more than about 1032:1; a member claiming
#: more than that over its compressed size is lying.
MAX_DEFLATE_RATIO = 1032


def npz_path(path: str | os.PathLike) -> Path:
    """``path`` with ``.npz`` added when it has no suffix (as numpy and implicit do)."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".npz")


def _is_file(target: Any) -> bool:
    return hasattr(target, "write") or hasattr(target, "read")


def save_npz(target: PathOrFile, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Writes ``arrays`` and ``meta`` (as the ``meta`` member) to a path, atomically, or to
    an open binary file (at its current position). Arrays are written in C order, the
    only order the reader accepts (a tensor stored transposed comes out Fortran-ordered)."""
    members = {name: np.asarray(array, order="C") for name, array in arrays.items()}
    members["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    if _is_file(target):
        np.savez(target, **members)
        return
    path = npz_path(target)
    remove_stale_temporaries(path)
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


def remove_stale_temporaries(path: Path) -> None:
    """Removes ``.<name>.tmp-<pid>`` files beside ``path`` whose process is gone (saves
    killed between writing and renaming); a live process's temporary is left alone."""
    prefix = f".{path.name}.tmp-"
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir() if str(path.parent) else Path(".").iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix) :]
            if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
                with contextlib.suppress(OSError):
                    entry.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class NpzReader:
    """The members of an open archive, read one at a time after their headers are checked."""

    def __init__(self, archive: zipfile.ZipFile, name: str, meta: dict[str, Any]) -> None:
        self.archive, self.name, self.meta = archive, name, meta
        self.members = {
            info.filename[: -len(".npy")]: info for info in archive.infolist() if info.filename.endswith(".npy")
        }

    def has(self, member: str) -> bool:
        return member in self.members

    def array(self, member: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """Member ``member``, which must have exactly this shape and dtype: checked in its
        header, and its sizes checked for plausibility, before its data is allocated."""
        info = self.members.get(member)
        if info is None:
            raise ValueError(f"{self.name}: the member {member!r} is missing; the file is damaged")
        dtype = np.dtype(dtype)
        expected = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if info.file_size < expected or (
            info.compress_type != zipfile.ZIP_STORED and expected > info.compress_size * MAX_DEFLATE_RATIO + (1 << 20)
        ):
            raise ValueError(
                f"{self.name}: the member {member!r} is {info.file_size} bytes where its shape {shape} needs "
                f"{expected}; the file is damaged"
            )
        try:
            return self._read(info, member, shape, dtype, expected)
        except ValueError:
            raise
        except ARCHIVE_ERRORS as error:
            raise ValueError(
                f"{self.name}: the member {member!r} cannot be read ({type(error).__name__}: {error}); "
                f"the file is damaged"
            ) from None

    def _read(
        self, info: zipfile.ZipInfo, member: str, shape: tuple[int, ...], dtype: Any, expected: int
    ) -> np.ndarray:
        with self.archive.open(info) as handle:
            try:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    header = np.lib.format.read_array_header_1_0(handle, max_header_size=10_000)
                elif version == (2, 0):
                    header = np.lib.format.read_array_header_2_0(handle, max_header_size=10_000)
                else:
                    raise ValueError(f"npy format version {version}")
            except (ValueError, SyntaxError, TypeError, EOFError, tokenize.TokenError) as error:
                raise ValueError(f"{self.name}: the member {member!r} has an unreadable header ({error})") from None
            got_shape, fortran, got_dtype = header
            if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != dtype or fortran:
                raise ValueError(
                    f"{self.name}: the member {member!r} holds {got_dtype} {tuple(got_shape)} where "
                    f"{dtype} {tuple(shape)} is expected; the file is damaged"
                )
            data = handle.read(expected)
        if len(data) != expected:
            raise ValueError(f"{self.name}: the member {member!r} is truncated; the file is damaged")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


@contextlib.contextmanager
def open_npz(source: PathOrFile, expected_format: str, max_version: int) -> Iterator[NpzReader]:
    """An :class:`NpzReader` over a file of ours (a path, or an open binary file), its
    metadata checked; a damaged or foreign file raises ValueError naming the problem.
    A path without suffix that does not exist is tried with ``.npz``."""
    with contextlib.ExitStack() as stack:
        if _is_file(source):
            name = str(getattr(source, "name", "the file object"))
            handle = source
        else:
            path = Path(source)
            if not path.exists() and not path.suffix:
                path = npz_path(path)
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a directory, not a file written by cml-rs")
            if not path.is_file():
                raise ValueError(f"{path} is not a regular file (a device or a pipe?); cml-rs reads files it wrote")
            name = str(path)
            handle = stack.enter_context(open(path, "rb"))
        try:
            archive = stack.enter_context(zipfile.ZipFile(handle))
        except ARCHIVE_ERRORS as error:
            raise ValueError(
                f"{name} is not a readable cml-rs file (truncated or corrupted, or not an npz archive: {error})"
            ) from None
        meta = _read_meta(archive, name)
        if meta.get("format") != expected_format:
            raise ValueError(f"{name} holds a {meta.get('format')!r} file, expected {expected_format!r}")
        version = meta.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{name}: its format version {version!r} is not a version; the file is damaged")
        if version > max_version:
            raise ValueError(
                f"{name} was written by format version {version}; this cml-rs reads up to {max_version} "
                f"(upgrade cml-rs)"
            )
        try:
            yield NpzReader(archive, name, meta)
        except (zipfile.BadZipFile, zlib.error, struct.error, EOFError) as error:
            raise ValueError(f"{name} is not a readable cml-rs file (truncated or corrupted?): {error}") from None


def _read_meta(archive: zipfile.ZipFile, name: str) -> dict[str, Any]:
    try:
        info = archive.getinfo("meta.npy")
    except KeyError:
        raise ValueError(f"{name} has no metadata; it was not written by cml-rs") from None
    if info.file_size > MAX_META_BYTES:
        raise ValueError(f"{name}: its metadata claims {info.file_size} bytes; the file is damaged")
    try:
        with archive.open(info) as handle:
            raw = handle.read(MAX_META_BYTES + 1)
        array = np.load(io.BytesIO(raw), allow_pickle=False)
        meta = json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode())
    except Exception as error:  # any failure to read the metadata means a damaged file
        raise ValueError(
            f"{name}: unreadable metadata ({type(error).__name__}: {error}); the file is damaged"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: its metadata is not a JSON object; the file is damaged")
    return meta


def meta_int(meta: dict[str, Any], key: str, name: str, minimum: int = 0, optional: bool = False) -> int | None:
    """An integer field of the metadata (not a bool), at least ``minimum``, or a ValueError."""
    value = meta.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: its metadata field {key!r} is {value!r}; the file is damaged")
    return value
