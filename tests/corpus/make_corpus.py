"""Writes the crafted damaged files of tests/corpus/ and their expected errors.

Each file is small and hand-made to probe one check of a reader: a wrong
version, checksum-valid nonsense, a declared size far beyond the file, a member
the format does not define. ``expected.json`` maps each file to the exception
and the text its message must hold; ``test_corpus.py`` loads every file and
checks both. Rerun this script (and commit its output) when a format changes:

    python tests/corpus/make_corpus.py
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import cml_rs
from cml_rs import datasets

HERE = Path(__file__).parent


def lsh_files() -> dict[str, tuple[bytes, str, str]]:
    index = cml_rs.LshIndex(4, n_tables=2, n_hashes=3, seed=1)
    index.add_items(np.arange(40, dtype=np.float32).reshape(10, 4) / 40, ids=np.arange(10))
    raw = bytes(index.to_bytes())
    header = 8 + 4 + 7 * 8 + 4

    def crc(data: bytes) -> bytes:
        body = data[:-4]
        return body + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "little")

    def field(data: bytes, i: int, value: int) -> bytes:
        return data[: 12 + 8 * i] + int(value).to_bytes(8, "little") + data[12 + 8 * i + 8 :]

    return {
        "lsh_good.lsh": (raw, "", ""),
        "lsh_version_7.lsh": (raw[:8] + (7).to_bytes(4, "little") + raw[12:], "ValueError", "format version 7"),
        "lsh_truncated.lsh": (raw[:100], "ValueError", "truncated"),
        "lsh_bad_checksum.lsh": (raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:], "ValueError", "checksum"),
        "lsh_huge_declared.lsh": (field(raw, 6, 2**40), "ValueError", "1099511627776 vectors"),
        "lsh_overflowing_sizes.lsh": (field(field(raw, 0, 2**16), 6, 2**32 - 1), "ValueError", "truncated"),
        "lsh_zero_tables.lsh": (crc(field(raw, 1, 0)), "ValueError", "declares dim 4, 0 tables"),
        "lsh_nan_width.lsh": (
            crc(raw[: header - 4] + np.float32(np.nan).tobytes() + raw[header:]),
            "ValueError",
            "bucket width is NaN",
        ),
        "lsh_negative_width.lsh": (
            crc(raw[: header - 4] + np.float32(-2).tobytes() + raw[header:]),
            "ValueError",
            "bucket width is -2",
        ),
        "lsh_repeated_ids.lsh": (crc(raw[:-12] + raw[-20:-12] + raw[-4:]), "ValueError", "negative or repeated"),
        "lsh_bad_defaults.lsh": (crc(field(raw, 5, 99)), "ValueError", "default search is invalid"),
        "lsh_foreign.lsh": (b"PK\x03\x04 not an index", "ValueError", "not a cml-rs LSH index"),
        "lsh_empty.lsh": (b"", "ValueError", "not a cml-rs LSH index"),
    }


def npz_bytes(members: dict[str, np.ndarray], extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    if extra:
        with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in extra.items():
                archive.writestr(name, data)
    return buffer.getvalue()


def meta_array(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def model_files() -> dict[str, tuple[bytes, str, str]]:
    model = cml_rs.CML(factors=3)
    meta = {
        "format": "cml-rs-model",
        "version": 1,
        "hyperparameters": model.hyperparameters(),
        "fitted": True,
        "n_users": 2,
        "n_items": 3,
    }
    users = np.full((2, 3), 0.1, np.float32)
    items = np.full((3, 3), 0.2, np.float32)

    def model_npz(meta_update=None, **arrays) -> bytes:
        members = {"user_factors": users, "item_factors": items, **arrays}
        return npz_bytes({**members, "meta": meta_array({**meta, **(meta_update or {})})})

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    return {
        "model_good.npz": (model_npz(), "", ""),
        "model_version_0.npz": (model_npz({"version": 0}), "ValueError", "format version 0 is not a version"),
        "model_version_true.npz": (model_npz({"version": True}), "ValueError", "format version True"),
        "model_version_99.npz": (model_npz({"version": 99}), "ValueError", "format version 99"),
        "model_other_format.npz": (model_npz({"format": "cml-rs-split"}), "ValueError", "holds a 'cml-rs-split' file"),
        "model_norm_200.npz": (
            model_npz(user_factors=np.full((2, 3), 200 / np.sqrt(3), np.float32)),
            "ValueError",
            "has norm 200",
        ),
        "model_wrong_shape.npz": (model_npz({"n_users": 5}), "ValueError", "holds float32 (2, 3) where float32 (5, 3)"),
        "model_huge_declared.npz": (model_npz({"n_users": 2**40}), "ValueError", "needs 13194139533312"),
        "model_huge_npy_header.npz": (
            npz_bytes({"item_factors": items, "meta": meta_array(meta)}, {"user_factors.npy": header.getvalue()}),
            "ValueError",
            "user_factors",
        ),
        "model_nan.npz": (model_npz(item_factors=np.full((3, 3), np.nan, np.float32)), "ValueError", "NaN or inf"),
        "model_bad_hyperparameter.npz": (
            model_npz({"hyperparameters": {**meta["hyperparameters"], "margin": -1}}),
            "ValueError",
            "margin must be >= 0.0",
        ),
        "model_no_meta.npz": (npz_bytes({"x": np.zeros(3)}), "ValueError", "has no metadata"),
        "model_meta_not_json.npz": (
            npz_bytes({"meta": np.frombuffer(b"{oops", np.uint8)}),
            "ValueError",
            "unreadable metadata",
        ),
        "model_not_zip.npz": (b"\x93NUMPY\x01\x00 no zip here", "ValueError", "not a readable cml-rs file"),
        "model_extra_member.npz": (
            npz_bytes(
                {"user_factors": users, "item_factors": items, "meta": meta_array(meta)},
                {"unrelated.npy": b"x" * 1000},
            ),
            "",
            "",
        ),
    }


def split_files() -> dict[str, tuple[bytes, str, str]]:
    matrix = sp.csr_matrix(np.eye(6, 8, dtype=np.float32) + np.eye(6, 8, 1, dtype=np.float32))
    split = datasets.split_paper(matrix, seed=0, min_items=1)
    buffer = io.BytesIO()
    split.save(buffer)
    good = buffer.getvalue()
    with np.load(io.BytesIO(good)) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays.pop("meta").tobytes())

    def split_npz(meta_update=None, **changes) -> bytes:
        return npz_bytes({**arrays, **changes, "meta": meta_array({**meta, **(meta_update or {})})})

    offsets = arrays["train_indptr"].copy()
    offsets[1] = offsets[2] + 5
    return {
        "split_good.npz": (good, "", ""),
        "split_bad_offsets.npz": (split_npz(train_indptr=offsets), "ValueError", "offsets are impossible"),
        "split_bad_fingerprint.npz": (split_npz({"fingerprint": "0" * 16}), "ValueError", "fingerprint"),
        "split_bad_shape.npz": (split_npz({"shape": [6]}), "ValueError", "is not (users, items)"),
        "split_item_out_of_range.npz": (
            split_npz(train_indices=np.full_like(arrays["train_indices"], 99)),
            "ValueError",
            "names items outside",
        ),
    }


def main() -> None:
    expected = {}
    for name, (data, error, message) in {**lsh_files(), **model_files(), **split_files()}.items():
        (HERE / name).write_bytes(data)
        expected[name] = {"error": error, "message": message}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(expected)} files")


if __name__ == "__main__":
    main()
