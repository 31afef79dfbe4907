"""cml_rs.LshIndex and the retrieval backends: recall, exclusion, persistence, threads, bad input."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import scipy.sparse as sp

import cml_rs
from cml_rs import retrieval
from cml_rs.retrieval import neighbour_recall


def clustered(n: int, dim: int = 32, clusters: int = 50, seed: int = 0, centre_seed: int = 100) -> np.ndarray:
    """Points around fixed cluster centres inside the unit ball, like CML embeddings."""
    centres = np.random.default_rng(centre_seed).standard_normal((clusters, dim)) * 0.8 / np.sqrt(dim)
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)) * 0.25 / np.sqrt(dim)
    return points.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    items = clustered(20000)
    queries = clustered(300, seed=1)
    index = cml_rs.LshIndex(32, seed=3)
    index.add_items(items)
    truth, _ = cml_rs.topk_l2(queries, items, 20)
    return items, queries, index, truth


def test_recall_against_exact_search_with_tuning(data):
    items, queries, index, truth = data
    choice = index.tune(queries[:150], k=20, target_recall=0.9)
    assert choice["reached"] and choice["recall"] >= 0.9
    assert index.n_probes == choice["n_probes"]
    found, dist = index.query(queries[150:], k=20)
    assert neighbour_recall(found, truth[150:]) >= 0.85  # held-out queries, tuned on the others
    exact = ((queries[150:, None, :] - items[np.maximum(found, 0)]) ** 2).sum(-1)
    valid = found >= 0
    np.testing.assert_allclose(dist[valid], exact[valid], rtol=1e-5, atol=1e-6)
    assert (np.diff(np.where(valid, dist, np.inf), axis=1) >= 0).all()


def test_more_probes_never_lower_recall(data):
    _, queries, index, truth = data
    recalls = [neighbour_recall(index.query(queries, k=20, n_probes=p)[0], truth) for p in (16, 64, 256, 1024)]
    assert recalls == sorted(recalls)
    assert recalls[-1] > 0.95


def test_exclusion_is_respected_inside_the_search(data):
    _, queries, index, truth = data
    excluded_rows = truth[:, :5]
    exclude = sp.csr_matrix(
        (np.ones(excluded_rows.size), (np.repeat(np.arange(len(queries)), 5), excluded_rows.ravel())),
        shape=(len(queries), 20000),
    )
    found, _ = index.query(queries, k=20, n_probes=512, exclude=exclude)
    for row, banned in zip(found, excluded_rows):
        assert not set(row.tolist()) & set(banned.tolist())
    # K unseen items: the next 15 true neighbours are still found.
    assert neighbour_recall(found[:, :15], truth[:, 5:20]) > 0.9


def test_ids_one_dimensional_queries_and_padding():
    index = cml_rs.LshIndex(2, n_tables=2, n_hashes=2, seed=0)
    index.add_items(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), ids=[10, 20, 30])
    ids, dist = index.query(np.array([0.9, 0.1]), k=5, n_probes=50)
    assert ids.shape == (3,) and ids[0] == 20  # min(k, len) columns
    assert sorted(ids.tolist()) == [10, 20, 30] and np.isfinite(dist).all()
    ids, dist = index.query(np.array([0.9, 0.1]), k=3, n_probes=50, exclude_ids=[10, 30])
    assert ids.tolist() == [20, -1, -1] and np.isinf(dist[1:]).all()
    index.add_items(np.array([[5.0, 5.0]]))
    assert len(index) == 4 and sorted(index.ids.tolist()) == [10, 20, 30, 31]


def test_deterministic_for_a_seed_and_thread_count(data):
    items, queries, _, _ = data
    a = cml_rs.LshIndex(32, seed=5)
    b = cml_rs.LshIndex(32, seed=5)
    a.add_items(items, num_threads=1)
    b.add_items(items, num_threads=2)
    one = a.query(queries, k=10, n_probes=64, num_threads=1)
    two = b.query(queries, k=10, n_probes=64, num_threads=4)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_save_load_pickle_round_trips(data, tmp_path):
    _, queries, index, _ = data
    path = tmp_path / "index.lsh"
    index.save(path)
    loaded = cml_rs.LshIndex.load(path)
    unpickled = pickle.loads(pickle.dumps(index))
    want = index.query(queries, k=10)
    for other in (loaded, unpickled):
        assert other.n_probes == index.n_probes and other.bucket_width == index.bucket_width
        got = other.query(queries, k=10)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    vector_bytes = 20000 * 32 * 4
    assert vector_bytes < index.memory_bytes() < 5 * vector_bytes


def test_damaged_files_raise_clear_errors(data, tmp_path):
    _, _, index, _ = data
    path = tmp_path / "index.lsh"
    index.save(path)
    raw = path.read_bytes()
    cases = {
        "truncated": (raw[: len(raw) // 2], "truncated"),
        "flipped": (raw[:500] + bytes([raw[500] ^ 1]) + raw[501:], "checksum"),
        "version": (raw[:8] + (7).to_bytes(4, "little") + raw[12:], "format version 7"),
        "foreign": (b"PK\x03\x04 not an index at all", "not a cml-rs LSH index"),
        "empty": (b"", "not a cml-rs LSH index"),
    }
    for name, (content, message) in cases.items():
        broken = tmp_path / f"{name}.lsh"
        broken.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            cml_rs.LshIndex.load(broken)
    with pytest.raises(FileNotFoundError, match=r"missing\.lsh"):
        cml_rs.LshIndex.load(tmp_path / "missing.lsh")


@pytest.mark.timeout(120)
def test_concurrent_queries_from_python_threads(data):
    _, queries, index, _ = data
    want = index.query(queries, k=10, n_probes=64)[0]
    results = [None] * 6

    def worker(i: int) -> None:
        results[i] = index.query(queries, k=10, n_probes=64, num_threads=2)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda i: i.query(np.ones((2, 3)), k=5), ValueError, "must have 32 columns"),
        (lambda i: i.query(np.full((1, 32), np.nan), k=5), ValueError, r"queries\[0, 0\] is NaN"),
        (lambda i: i.query(np.ones((1, 32)), k=0), ValueError, "k must be at least 1"),
        (lambda i: i.query(np.ones((1, 32)), k=1, n_probes=0), ValueError, "n_probes must be at least 1"),
        (
            lambda i: i.query(np.ones((1, 32)), k=1, n_tables=99),
            ValueError,
            "n_tables must be between 1 and 16",
        ),
        (
            lambda i: i.query(np.ones((2, 32)), k=1, exclude=sp.csr_matrix((3, 5))),
            ValueError,
            "exclude has 3 rows but there are 2 queries",
        ),
        (lambda i: i.add_items(np.ones((2, 32)), ids=[0, 1]), ValueError, "id 0 occurs more than once"),
        (lambda i: i.add_items(np.ones((2, 32)), ids=[1]), ValueError, "one id per vector"),
        (lambda i: i.add_items(np.ones((1, 32)), ids=[-4]), ValueError, "ids must be non-negative, got -4"),
        (lambda i: i.add_items(np.full((1, 32), np.inf)), ValueError, r"vectors\[0, 0\] is inf"),
        (lambda i: i.tune(np.ones((2, 32)), target_recall=1.5), ValueError, "target_recall"),
    ],
)
def test_bad_input(data, call, error, message):
    _, _, index, _ = data
    with pytest.raises(error, match=message):
        call(index)


def test_bad_construction_and_empty_index():
    with pytest.raises(ValueError, match="n_hashes must be between 1 and 32"):
        cml_rs.LshIndex(8, n_hashes=40)
    with pytest.raises(ValueError, match="bucket_width must be a positive number"):
        cml_rs.LshIndex(8, bucket_width=-1.0)
    with pytest.raises(ValueError, match="dim must be between 1 and 65536, got 0"):
        cml_rs.LshIndex(0)
    empty = cml_rs.LshIndex(8)
    with pytest.raises(ValueError, match="the index is empty"):
        empty.query(np.ones(8), k=3)
    with pytest.raises(ValueError, match="nothing to add"):
        empty.add_items(np.ones((0, 8)))


def test_one_interface_for_three_backends(data):
    items, queries, _, truth = data
    exclude = sp.csr_matrix(
        (np.ones(len(queries)), (np.arange(len(queries)), truth[:, 0])), shape=(len(queries), len(items))
    )
    for backend in ("exact", "lsh", "hnsw"):
        index = retrieval.build_index(backend, items, seed=0)
        ids, dist = index.query(queries, 20, exclude=exclude)
        assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == (len(queries), 20)
        assert not np.any(ids == truth[:, :1]), backend
        assert neighbour_recall(ids[:, :19], truth[:, 1:20]) > 0.85, backend
        assert index.memory_bytes() > 0
        single_ids, _ = index.query(queries[0], 5)
        assert single_ids.shape == (5,)


def test_hnsw_quirks_are_hidden():
    vectors = clustered(50, dim=8, clusters=3)
    index = retrieval.HnswIndex(vectors, M=4, ef_construction=8, ef=1)
    ids, dist = index.query(vectors[:3], k=60)  # more than there are items, ef < k
    assert ids.shape == (3, 50) and np.isfinite(dist).all()
    assert sorted(ids[0].tolist()) == list(range(50))
    exclude = sp.csr_matrix(np.ones((3, 50), np.float32))
    ids, _ = index.query(vectors[:3], k=5, exclude=exclude)
    assert (ids == -1).all()


def test_build_index_rejects_unknown_backends():
    with pytest.raises(ValueError, match="backend must be"):
        retrieval.build_index("faiss", np.ones((3, 2)))
    with pytest.raises(ValueError, match="empty set of vectors"):
        retrieval.ExactIndex(np.ones((0, 4)))
