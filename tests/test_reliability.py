"""Hostile but realistic input: absurd sizes, hangs, silent wrong answers, damaged
files, leaked resources, resumable training. Each case once aborted Python,
leaked a Rust panic, hung, or returned something wrong (issue 11); cases that
could abort run in a subprocess, so an abort fails the test instead of the run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import cml_rs
from cml_rs import datasets, evaluation, retrieval

RNG = np.random.default_rng(0)
ITEMS = RNG.standard_normal((200, 8)).astype(np.float32) * 0.1
QUERIES = RNG.standard_normal((5, 8)).astype(np.float32) * 0.1


def run_isolated(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter; an abort or a hang shows up in the result."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def assert_clean(result: subprocess.CompletedProcess, *expected: str) -> None:
    """The subprocess ended normally (no signal) and printed each expected text."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    for text in expected:
        assert text in result.stdout, result.stdout + result.stderr[-2000:]


@pytest.fixture(scope="module")
def model() -> cml_rs.CML:
    data = datasets.synthetic(n_users=300, n_items=200, n_interactions=4000, n_clusters=5, seed=1)
    return cml_rs.CML(factors=8, epochs=2, num_threads=1).fit(data.user_items, show_progress=False)


# -------------------------------------------------------------------- 1. sizes


@pytest.mark.parametrize("k", [2**31, 2**62, 2**63 - 1])
def test_huge_k_is_clamped_to_the_catalogue(k):
    ids, dist = cml_rs.topk_l2(QUERIES, ITEMS, k)
    assert ids.shape == (5, 200) and np.isfinite(dist).all()
    index = cml_rs.LshIndex(8)
    index.add_items(ITEMS)
    ids, _ = index.query(QUERIES, k)
    assert ids.shape == (5, 200)
    assert retrieval.ExactIndex(ITEMS).query(QUERIES, k)[0].shape == (5, 200)
    assert index.tune(QUERIES, k=k, target_recall=0.5)["reached"]


def test_huge_n_and_k_through_the_model_and_evaluation(model):
    user_items = sp.csr_matrix((3, model.n_items), dtype=np.float32)
    ids, _ = model.recommend([0, 1, 2], user_items, N=2**40)
    assert ids.shape == (3, model.n_items)
    assert model.similar_items(0, N=2**40)[0].shape == (model.n_items,)
    assert model.similar_users(0, N=2**62)[0].shape == (model.n_users,)
    train = sp.csr_matrix((model.n_users, model.n_items), dtype=np.float32)
    test = sp.csr_matrix(np.eye(model.n_users, model.n_items, dtype=np.float32))
    result = evaluation.ranking_metrics_at_k(model, train, test, K=2**40)
    assert result["recall"] == 1.0


def test_sizes_that_cannot_be_allocated_raise_memory_error():
    result = run_isolated(
        """
        import numpy as np, cml_rs
        big = np.zeros((200_000, 4), np.float32)
        try:
            cml_rs.sqdist(big, big)
        except MemoryError as error:
            print("MemoryError", error)
        """
    )
    assert_clean(result, "MemoryError", "a 200000 x 200000 distance matrix would need 149.0 GiB")


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: cml_rs.WarpSampler(m, 4, 10**9), ValueError, "4 pairs x 1000000000 negatives"),
        (lambda m: cml_rs.WarpSampler(m, prefetch=2**40), ValueError, "prefetch must be between 1 and 1024"),
        (lambda m: cml_rs.LshIndex(2**40), ValueError, "dim must be between 1 and 65536"),
        (lambda m: cml_rs.LshIndex(8, n_tables=10**9), ValueError, "n_tables must be between 1 and 1024"),
        (lambda m: cml_rs.LshIndex(8, n_tables=2**60), ValueError, "n_tables must be between 1 and 1024"),
        (
            lambda m: cml_rs.topk_l2(QUERIES, ITEMS, 3, num_threads=2**63),
            ValueError,
            "num_threads is 9223372036854775808",
        ),
        (
            lambda m: cml_rs.topk_l2(QUERIES, ITEMS, 3, num_threads=10**6),
            ValueError,
            "num_threads must be at most 1024",
        ),
        (lambda m: cml_rs.topk_l2(QUERIES, ITEMS, 2**70), ValueError, "k is 1180591620717411303424"),
        (lambda m: cml_rs.WarpSampler(m, seed=-1), ValueError, "seed must be a non-negative integer, got -1"),
    ],
)
def test_absurd_arguments_are_named(call, error, message):
    matrix = sp.csr_matrix(np.eye(4, 6, dtype=np.float32))
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        call(matrix)
    assert time.perf_counter() - start < 5


def test_no_panic_crosses_the_binding():
    # Every failure of the native layer is an Exception subclass (PanicException is not).
    result = run_isolated(
        """
        import numpy as np, cml_rs
        cases = [
            lambda: cml_rs.topk_l2(np.ones((2, 3)), np.ones((4, 3)), 2**62),
            lambda: cml_rs.LshIndex(8, n_tables=2**60),
            lambda: cml_rs.sqdist(np.ones((2, 3)), np.ones((4, 3)), num_threads=2**63),
            lambda: cml_rs.rank_weights(np.ones(3), np.ones((3, 2)), 0.5, 2**62),
        ]
        for case in cases:
            try:
                case()
            except Exception as error:
                print("clean", type(error).__name__)
        print("done")
        """
    )
    assert_clean(result, "done")
    assert "PanicException" not in result.stderr


# -------------------------------------------------------------------- 2. hangs


@pytest.mark.timeout(60)
def test_absurd_probes_on_a_tiny_index_return_quickly():
    index = cml_rs.LshIndex(2, n_tables=2, n_hashes=8)
    index.add_items(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    start = time.perf_counter()
    ids, _ = index.query(np.array([[0.1, 0.0], [5.0, 5.0]]), k=3, n_probes=10**9)
    assert time.perf_counter() - start < 10
    assert ids[0, 0] == 0
    # Far from every item, multi-probe (slots moved by one) reaches no bucket: padded, not hung.
    assert ids[1].tolist() == [-1, -1, -1]


@pytest.mark.timeout(60)
def test_loading_from_a_fifo_or_a_device_does_not_block(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), Path("/dev/null")):
        with pytest.raises(ValueError, match="not a regular file"):
            cml_rs.LshIndex.load(path)
        with pytest.raises(ValueError, match="not a regular file"):
            cml_rs.CML.load(path)
    with pytest.raises(ValueError, match="is a directory"):
        cml_rs.LshIndex.load(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        cml_rs.CML.load(tmp_path)


# -------------------------------------------------------------------- 3. silent wrong results


def test_vectors_whose_distances_overflow_are_refused():
    with pytest.raises(ValueError, match="rescale the vectors"):
        cml_rs.topk_l2(QUERIES, ITEMS * 1e20, 3)
    outlier = ITEMS.copy()
    outlier[0] = 1e30
    with pytest.raises(ValueError, match="rescale the vectors"):
        cml_rs.LshIndex(8).add_items(outlier)


def test_one_outlier_does_not_blind_the_lsh_index():
    vectors = RNG.standard_normal((3000, 16)).astype(np.float32) * 0.1
    vectors[0] = 100.0
    queries = vectors[1:101] + RNG.standard_normal((100, 16)).astype(np.float32) * 0.01
    index = cml_rs.LshIndex(16, seed=0)
    index.add_items(vectors)
    truth, _ = cml_rs.topk_l2(queries, vectors, 5)
    found, _ = index.query(queries, 5, n_probes=256)
    assert retrieval.neighbour_recall(found, truth) > 0.9


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cml_rs.LshIndex(8).add_items(ITEMS[:2], ids=[0.9, 1.9]), "ids must hold integer ids"),
        (lambda: cml_rs.rank_weights(np.ones(3, complex), np.ones((3, 2)), 0.5, 10), "pos_dist must hold real"),
        (lambda: cml_rs.rank_weights(np.ones(3, bool), np.ones((3, 2)), 0.5, 10), "pos_dist must hold real"),
        (lambda: cml_rs.rank_weights(np.array(["a"] * 3), np.ones((3, 2)), 0.5, 10), "pos_dist must hold real"),
    ],
)
def test_wrong_types_are_refused_not_truncated(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_model_ids_must_be_whole_numbers(model):
    with pytest.raises(TypeError, match="userid must hold integer ids"):
        model.recommend([0.7], sp.csr_matrix((1, model.n_items), dtype=np.float32))
    ids, _ = model.recommend(np.array([2.0]), sp.csr_matrix((1, model.n_items), dtype=np.float32), N=3)
    assert ids.shape == (1, 3)  # 2.0 is a whole number


def test_rank_weights_are_exact_for_huge_catalogues():
    weights, _ = cml_rs.rank_weights(np.array([1.0], np.float32), np.array([[0.0, 5.0]], np.float32), 0.5, 2**62)
    assert weights[0] == pytest.approx(np.log(2**61 + 1), rel=1e-6)  # floor(2^62 * 1 / 2) + 1


def test_epochs_beyond_range_and_bad_fractions(interactions):
    sampler = cml_rs.WarpSampler(interactions, batch_size=64)
    with pytest.raises(ValueError, match="epoch is 18446744073709551615"):
        sampler.set_epoch(2**64 - 1)
    sampler.set_epoch(2**63 - 1)
    assert sum(len(u) for u, _, _ in sampler) == interactions.nnz  # the last epoch is whole
    for fractions in ((np.nan, 0.5, 0.5), (1.5, -0.5, 0.0), (0.6, 0.2)):
        with pytest.raises(ValueError, match="fractions must be three numbers"):
            datasets.split_paper(interactions, fractions=fractions)


def test_hnsw_refuses_nan():
    pytest.importorskip("hnswlib")
    bad = ITEMS.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"vectors\[3, 1\] is nan"):
        retrieval.HnswIndex(bad)
    with pytest.raises(ValueError, match=r"queries\[0, 1\] is nan"):
        retrieval.HnswIndex(ITEMS).query(bad[3:4], 2)


def test_csv_headers_and_byte_order_marks(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("user,item\n1,10\n1,11\n2,10\n")
    data = datasets.load_interactions(plain)
    assert data.user_items.shape == (2, 2) and data.user_ids.tolist() == ["1", "2"]
    assert "header 'user,item' skipped" in data.note
    bom = tmp_path / "bom.tsv"
    bom.write_bytes("\ufeffann\tbook\nbob\tbook\n".encode())
    data = datasets.load_interactions(bom)
    assert data.user_ids.tolist() == ["ann", "bob"] and "no header" in data.note
    wide = tmp_path / "wide.csv"
    wide.write_text('user,item\nann,"' + "x" * 200_000 + '"\n')
    with pytest.raises(ValueError, match=r"wide\.csv:2: field larger than field limit"):
        datasets.load_interactions(wide)


# -------------------------------------------------------------------- damaged files


def _rewrite_npz(path: Path, out: Path, meta_edit=None, arrays_edit=None, extra=None) -> Path:
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    if meta_edit:
        meta_edit(meta)
    if arrays_edit:
        arrays_edit(arrays)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(out, **arrays)
    if extra:
        with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in extra.items():
                archive.writestr(name, data)
    return out


@pytest.mark.parametrize(
    ("meta_edit", "arrays_edit", "message"),
    [
        (lambda m: m.update(version=0), None, "format version 0 is not a version"),
        (lambda m: m.update(version=-1), None, "format version -1 is not a version"),
        (lambda m: m.update(version=True), None, "format version True is not a version"),
        (lambda m: m["hyperparameters"].update(max_norm=0.5), None, "outside the ball of radius 0.5"),
        (None, lambda a: a["user_factors"].__setitem__(0, 200.0 / np.sqrt(8)), "has norm 200"),
        (lambda m: m.update(n_users="many"), None, "'n_users' is 'many'"),
        (lambda m: m.pop("hyperparameters"), None, "hyper-parameters are missing"),
        (lambda m: m.update(n_features=4_000_000), None, "projector.hidden.weight' is missing"),
        (lambda m: m.update(history=7), None, "history is not a list"),
        (lambda m: m.update(n_negatives=0), None, "'n_negatives' is 0"),
    ],
)
def test_checksum_valid_nonsense_in_a_model_file_is_refused(model, tmp_path, meta_edit, arrays_edit, message):
    path = tmp_path / "model.npz"
    model.save(path)
    broken = _rewrite_npz(path, tmp_path / "broken.npz", meta_edit, arrays_edit)
    with pytest.raises(ValueError, match=message):
        cml_rs.CML.load(broken)


def test_a_file_from_before_the_density_rule_keeps_its_negatives(tmp_path):
    # Such files hold U only as the n_negatives setting, not as the fit's own field.
    data = datasets.synthetic(n_users=60, n_items=40, n_interactions=600, n_clusters=3, seed=1)
    fitted = cml_rs.CML(factors=4, epochs=1, n_negatives=7, num_threads=1).fit(data.user_items, show_progress=False)
    fitted.save(tmp_path / "model.npz")
    old = _rewrite_npz(tmp_path / "model.npz", tmp_path / "old.npz", lambda m: m.pop("n_negatives"))
    assert cml_rs.CML.load(old).n_negatives_ == 7


def test_fold_in_without_a_known_negatives_count_says_what_to_set(model, tmp_path):
    # A fitted file that holds neither the U of its fit nor a setting (written by hand)
    # loads and ranks; fold-in, which must sample that U, asks for it instead of guessing.
    model.save(tmp_path / "model.npz")
    bare = _rewrite_npz(tmp_path / "model.npz", tmp_path / "bare.npz", lambda m: m.pop("n_negatives"))
    loaded = cml_rs.CML.load(bare)
    rows = sp.csr_matrix(([1.0, 1.0], ([0, 0], [3, 5])), shape=(1, loaded.n_items), dtype=np.float32)
    assert len(loaded.recommend(0, rows, N=3)[0]) == 3
    with pytest.raises(ValueError, match="set its n_negatives to fold in"):
        loaded.recommend(0, rows, N=3, recalculate_user=True)
    loaded.n_negatives = 5
    assert len(loaded.recommend(0, rows, N=3, recalculate_user=True)[0]) == 3


def test_members_the_format_does_not_define_are_never_read(model, tmp_path):
    path = tmp_path / "model.npz"
    model.save(path)
    # 256 MiB of zeros, deflated to a few hundred KB, beside the real members.
    bomb = io.BytesIO()
    np.lib.format.write_array(bomb, np.zeros(2**25, np.float64))
    _rewrite_npz(path, tmp_path / "bomb.npz", extra={"bomb.npy": bomb.getvalue()})
    result = run_isolated(
        f"""
        import resource, cml_rs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = cml_rs.CML.load({str(tmp_path / "bomb.npz")!r})
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("loaded", model.n_users, "grew_mb", grown // 1024)
        """
    )
    assert_clean(result, "loaded 300")
    assert int(result.stdout.split("grew_mb")[1]) < 100


def test_declared_sizes_are_checked_before_allocating(model, tmp_path):
    path = tmp_path / "model.npz"
    model.save(path)

    def huge_header(arrays):
        arrays["user_factors"] = np.zeros(0, np.float32)

    broken = _rewrite_npz(path, tmp_path / "lies.npz", lambda m: m.update(n_users=2**40), huge_header)
    with pytest.raises(ValueError, match="needs .* the file is damaged|would need"):
        cml_rs.CML.load(broken)
    not_npz = tmp_path / "model.npz"
    not_npz.write_bytes(b"\x93NUMPY garbage that is not a zip archive")
    with pytest.raises(ValueError, match="not a readable cml-rs file") as raised:
        cml_rs.CML.load(not_npz)
    assert "allow_pickle" not in str(raised.value)


def test_lsh_files_with_a_valid_checksum_but_impossible_content(tmp_path):
    import zlib

    index = cml_rs.LshIndex(4, n_tables=2, n_hashes=3)
    index.add_items(ITEMS[:20, :4], ids=np.arange(20))
    raw = bytearray(index.to_bytes())
    header = 8 + 4 + 7 * 8 + 4

    def with_crc(data: bytearray) -> bytes:
        data = bytearray(data[:-4])
        return bytes(data + (zlib.crc32(bytes(data)) & 0xFFFFFFFF).to_bytes(4, "little"))

    width_nan = bytearray(raw)
    width_nan[header - 4 : header] = np.float32(np.nan).tobytes()
    duplicate_ids = bytearray(raw)
    duplicate_ids[-12:-4] = duplicate_ids[-20:-12]  # the last id repeats the one before
    negative_id = bytearray(raw)
    negative_id[-12:-4] = np.int64(-5).tobytes()
    nan_projection = bytearray(raw)
    nan_projection[header : header + 4] = np.float32(np.nan).tobytes()
    huge = bytearray(raw)
    huge[12 + 6 * 8 : 12 + 7 * 8] = np.uint64(2**40).tobytes()
    for data, message in [
        (width_nan, "bucket width is NaN"),
        (duplicate_ids, "ids are negative or repeated"),
        (negative_id, "ids are negative or repeated"),
        (nan_projection, "hash functions hold non-finite"),
        (huge, "declares dim 4, 2 tables of 3 hashes and 1099511627776 vectors"),
    ]:
        path = tmp_path / "index.lsh"
        path.write_bytes(with_crc(data))
        with pytest.raises(ValueError, match=message):
            cml_rs.LshIndex.load(path)


# -------------------------------------------------------------------- 4. resources


def test_thread_pools_are_reused_not_hoarded():
    result = run_isolated(
        """
        import os, numpy as np, cml_rs
        q, x = np.ones((64, 16), np.float32), np.ones((20000, 16), np.float32)
        for threads in range(1, 61):
            cml_rs.topk_l2(q, x, 5, num_threads=threads)
        import time; time.sleep(1)
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        print("pool_threads", sum(n.startswith("cml-rs-") for n in names))
        """
    )
    assert_clean(result, "pool_threads")
    # The four most recent pools (57..60 threads) may stay; before, all 1,830 did.
    assert int(result.stdout.split("pool_threads")[1]) <= 57 + 58 + 59 + 60


def test_filtering_many_items_costs_memory_in_the_filter_not_users_times_filter(tmp_path):
    factors = np.zeros((50_000, 8), np.float32)
    items = RNG.standard_normal((3000, 8)).astype(np.float32) * 0.1
    model = cml_rs.CML(factors=8)
    arrays = {"user_factors": factors, "item_factors": items}
    meta = {
        "format": "cml-rs-model",
        "version": 1,
        "hyperparameters": model.hyperparameters(),
        "fitted": True,
        "n_users": 50_000,
        "n_items": 3000,
    }
    cml_rs._io.save_npz(tmp_path / "wide.npz", arrays, meta)
    result = run_isolated(
        f"""
        import resource, numpy as np, scipy.sparse as sp, cml_rs
        model = cml_rs.CML.load({str(tmp_path / "wide.npz")!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = sp.csr_matrix((50_000, 3000), dtype=np.float32)
        ids, _ = model.recommend(np.arange(50_000), rows, N=5, filter_items=np.arange(0, 3000, 2))
        assert (ids % 2 == 1).all()
        print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    assert_clean(result, "grew_mb")
    # A users x filter matrix would be 50,000 x 1,500 entries (about 900 MB in scipy).
    assert int(result.stdout.split("grew_mb")[1]) < 300


def test_temporaries_of_killed_saves_are_cleaned_up(model, tmp_path):
    target = tmp_path / "model.npz"
    stale = tmp_path / ".model.npz.tmp-4194000"  # no such process
    live = tmp_path / f".model.npz.tmp-{os.getppid()}"  # a live process: another save in progress
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    model.save(target)
    assert not stale.exists() and live.exists()
    index = cml_rs.LshIndex(8)
    index.add_items(ITEMS)
    (tmp_path / ".index.lsh.tmp-4194000").write_bytes(b"x")
    index.save(tmp_path / "index.lsh")
    assert not (tmp_path / ".index.lsh.tmp-4194000").exists()


@pytest.mark.timeout(300)
def test_saves_killed_at_random_moments_never_damage_the_file(model, tmp_path):
    target = tmp_path / "model.npz"
    model.save(target)
    saver = tmp_path / "saver.py"
    saver.write_text(
        textwrap.dedent(
            f"""
            import cml_rs
            model = cml_rs.CML.load({str(target)!r})
            print("ready", flush=True)
            while True:
                model.save({str(target)!r})
            """
        )
    )
    rng = np.random.default_rng(3)
    for _ in range(8):
        process = subprocess.Popen([sys.executable, str(saver)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.5)))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        process.stdout.close()
        back = cml_rs.CML.load(target)  # the old file or the new one, never half of one
        np.testing.assert_array_equal(back.item_factors, model.item_factors)
    model.save(target)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


# -------------------------------------------------------------------- 5. resumable training

TRAIN_SCRIPT = """
import json, os, signal, sys, numpy as np, cml_rs
from cml_rs import datasets
data = datasets.synthetic(n_users=600, n_items=400, n_interactions=12000, n_clusters=8, seed=4)
split = datasets.split_paper(data.user_items, seed=0)
mode, checkpoint, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
def killer(epoch, elapsed, loss, metrics):
    if mode == "kill" and epoch == 3:
        os.kill(os.getpid(), signal.SIGKILL)
model = cml_rs.CML(factors=16, epochs=10, num_threads=2, covariance_rows="sampled", eval_every=1, patience=50,
                   **options)
model.fit(split.train, validation=split.validation, show_progress=False, callback=killer,
          checkpoint=None if mode == "plain" else checkpoint)
np.save(out, model.item_factors)
print("epochs", len(model.history_))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("options", [{}, {"adaptive_margin": 0.5}], ids=["defaults", "adaptive-margins"])
def test_a_fit_killed_and_resumed_ends_bit_identical(tmp_path, options):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    checkpoint = tmp_path / "fit.ckpt"

    def run(mode: str, out: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), mode, str(checkpoint), str(tmp_path / out), json.dumps(options)],
            capture_output=True,
            text=True,
            timeout=240,
        )

    assert run("plain", "plain.npy").returncode == 0
    killed = run("kill", "resumed.npy")
    assert killed.returncode == -signal.SIGKILL and checkpoint.exists()
    resumed = run("resume", "resumed.npy")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "epochs 10" in resumed.stdout  # the history runs on from before the kill
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), np.load(tmp_path / "resumed.npy"))
    # A finished checkpoint returns at once with the same model.
    again = run("resume", "again.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), np.load(tmp_path / "again.npy"))
    assert again.returncode == 0


def test_a_checkpoint_of_another_fit_is_refused(tmp_path, interactions):
    checkpoint = tmp_path / "fit.ckpt"
    cml_rs.CML(factors=8, epochs=2).fit(interactions, show_progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="checkpoint of another fit"):
        cml_rs.CML(factors=8, epochs=2, margin=0.7).fit(interactions, show_progress=False, checkpoint=checkpoint)


# -------------------------------------------------------------------- 6. messages


def test_index_arrays_of_any_integer_type_work_and_other_types_are_named():
    matrix = sp.csr_matrix(np.eye(4, 6, dtype=np.float32))
    matrix.indices = matrix.indices.astype(np.uint32)
    assert cml_rs.WarpSampler(matrix, batch_size=2).n_pairs == 4
    with pytest.raises(TypeError, match="CSR index arrays must be 1-D numpy arrays of int32 or int64, got float64"):
        cml_rs._native.topk_l2(QUERIES, ITEMS, 2, (np.zeros(6), np.zeros(0), 200))


def test_nan_in_item_features_names_item_features(interactions):
    features = sp.csr_matrix(np.ones((interactions.shape[1], 3), np.float32))
    features.data[0] = np.nan
    with pytest.raises(ValueError, match="item_features must hold finite, non-negative values"):
        cml_rs.CML(epochs=1).fit(interactions, item_features=features, show_progress=False)


def test_a_user_with_every_item_gets_advice_cml_users_can_follow():
    matrix = sp.csr_matrix(np.array([[1, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=np.float32))
    with pytest.raises(ValueError, match="user 1 has all 3 items .* drop this user from user_items"):
        cml_rs.CML(epochs=1).fit(matrix, show_progress=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--users", "1180591620717411303424"], "--users 1180591620717411303424 is not a user of the model"),
        (["-n", "0"], "N must be at least 1"),
    ],
)
def test_cli_bad_numbers_are_one_line(model, tmp_path, argv, message):
    path = tmp_path / "model.npz"
    model.save(path)
    data = tmp_path / "plays.tsv"
    rows = sp.find(sp.random(model.n_users, model.n_items, density=0.05, random_state=0, format="csr"))
    data.write_text("".join(f"u{u}\ti{i}\n" for u, i in zip(rows[0], rows[1])))
    result = subprocess.run(
        [sys.executable, "-m", "cml_rs", "recommend", str(path), str(data), "--users", "0", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr


def test_cli_refuses_absurd_hyper_parameters(tmp_path):
    data = tmp_path / "plays.tsv"
    data.write_text("a\tx\nb\ty\n")
    for option, value, message in [
        ("--learning-rate", "1e30", "learning_rate must be <= 100.0"),
        ("--lambda-c", "1e38", "lambda_c must be <= 1000000.0"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "cml_rs", "train", str(data), option, value, "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
