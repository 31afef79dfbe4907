"""cml_rs.WarpSampler: coverage, negatives, determinism, threads, fork, bad input."""

from __future__ import annotations

import os
import pickle
import threading
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import random_interactions

import cml_rs


def epoch_pairs(sampler: cml_rs.WarpSampler) -> list:
    pairs = []
    for users, positives, _ in sampler:
        pairs.extend(zip(users.tolist(), positives.tolist()))
    return pairs


def all_batches(sampler: cml_rs.WarpSampler) -> list:
    return [tuple(a.copy() for a in batch) for batch in sampler]


def test_every_pair_once_per_epoch_and_tail_kept(interactions):
    sampler = cml_rs.WarpSampler(interactions, batch_size=64, n_negatives=3, seed=1)
    assert len(sampler) == -(-interactions.nnz // 64)
    sizes = [len(users) for users, _, _ in sampler]
    assert sizes[-1] == interactions.nnz % 64 or sizes[-1] == 64
    assert sum(sizes) == interactions.nnz
    coo = interactions.tocoo()
    expected = sorted(zip(coo.row.tolist(), coo.col.tolist()))
    assert sorted(epoch_pairs(sampler)) == expected


def test_batches_are_int64_with_shapes_torch_takes_without_copy(interactions):
    sampler = cml_rs.WarpSampler(interactions, batch_size=32, n_negatives=7)
    users, positives, negatives = next(iter(sampler))
    assert users.dtype == positives.dtype == negatives.dtype == np.int64
    assert users.shape == positives.shape == (32,)
    assert negatives.shape == (32, 7)
    assert negatives.flags.c_contiguous
    tensor = torch.from_numpy(negatives)
    assert tensor.data_ptr() == negatives.ctypes.data


def test_negatives_are_never_positives_and_uniform_over_the_rest():
    matrix = random_interactions(n_users=20, n_items=30, per_user=10, seed=3)
    sampler = cml_rs.WarpSampler(matrix, batch_size=50, n_negatives=50, seed=2)
    counts = Counter()
    for _ in range(5):
        for users, _, negatives in sampler:
            for user, row in zip(users, negatives):
                seen = set(matrix.indices[matrix.indptr[user] : matrix.indptr[user + 1]].tolist())
                assert not seen.intersection(row.tolist())
                if user == 0:
                    counts.update(row.tolist())
    # User 0 has 10 pairs x 50 negatives x 5 epochs = 2500 draws over 20 eligible
    # items: 125 each on average, standard deviation about 11.
    assert len(counts) == 20
    assert min(counts.values()) > 75 and max(counts.values()) < 175


def test_popularity_weighted_negatives_favour_popular_items():
    # Item i >= 1 is liked by users 0..i (popularity i + 1); the last user likes
    # only item 0. With exponent 1 that user's negative is item i with
    # probability proportional to popularity + 1 = i + 2.
    n = 40
    rows = [u for i in range(1, n) for u in range(i + 1)] + [n]
    cols = [i for i in range(1, n) for _ in range(i + 1)] + [0]
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n + 1, n))
    counts = Counter()
    sampler = cml_rs.WarpSampler(matrix, batch_size=256, n_negatives=64, seed=5, popularity_exponent=1.0)
    for _ in range(40):
        for users, _, negatives in sampler:
            counts.update(negatives[users == n].ravel().tolist())
    assert 0 not in counts and sum(counts.values()) == 40 * 64
    low = sum(counts[i] for i in range(1, 11))
    high = sum(counts[i] for i in range(28, 38))
    # Expected ratio (30 + ... + 39) / (3 + ... + 12) = 345 / 75 = 4.6.
    assert 3.6 < high / low < 5.8
    uniform = cml_rs.WarpSampler(matrix, batch_size=256, n_negatives=64, seed=5)
    assert uniform.popularity_exponent == 0.0 and sampler.popularity_exponent == 1.0
    replay = pickle.loads(pickle.dumps(sampler))
    assert replay.popularity_exponent == 1.0


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_are_disjoint_complete_and_keep_their_negatives(interactions, world_size):
    def triples(sampler):
        return sorted(
            (int(u), int(p), tuple(n.tolist()))
            for users, positives, negatives in sampler
            for u, p, n in zip(users, positives, negatives)
        )

    whole = cml_rs.WarpSampler(interactions, batch_size=7, n_negatives=4, seed=3)
    whole.set_epoch(2)
    shares = [
        cml_rs.WarpSampler(interactions, batch_size=7, n_negatives=4, seed=3, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    drawn = []
    for share in shares:
        share.set_epoch(2)
        part = triples(share)
        assert abs(len(part) - interactions.nnz / world_size) < 1
        drawn.extend(part)
    assert sorted(drawn) == triples(whole)
    assert "rank=1, world_size" in repr(shares[1])
    copy = pickle.loads(pickle.dumps(shares[1]))
    assert (copy.rank, copy.world_size) == (1, world_size)


def test_without_check_negatives_cover_all_items():
    matrix = random_interactions(n_users=5, n_items=8, per_user=6, seed=4)
    sampler = cml_rs.WarpSampler(matrix, batch_size=30, n_negatives=100, check_negative=False)
    _, _, negatives = next(iter(sampler))
    assert set(np.unique(negatives).tolist()) == set(range(8))


def test_same_seed_gives_the_same_batches_for_any_thread_count(interactions):
    reference = all_batches(cml_rs.WarpSampler(interactions, batch_size=16, seed=5, num_threads=1))
    for threads in (2, 4, 0):
        other = all_batches(cml_rs.WarpSampler(interactions, batch_size=16, seed=5, num_threads=threads))
        assert len(other) == len(reference)
        for a, b in zip(reference, other):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    different = all_batches(cml_rs.WarpSampler(interactions, batch_size=16, seed=6))
    assert not np.array_equal(different[0][0], reference[0][0])


def test_large_batches_are_deterministic_across_threads():
    matrix = random_interactions(n_users=2000, n_items=500, per_user=20, seed=7)
    one = next(iter(cml_rs.WarpSampler(matrix, batch_size=40000, seed=1, num_threads=1)))
    two = next(iter(cml_rs.WarpSampler(matrix, batch_size=40000, seed=1, num_threads=2)))
    for x, y in zip(one, two):
        np.testing.assert_array_equal(x, y)


def test_epochs_advance_and_set_epoch_replays(interactions):
    sampler = cml_rs.WarpSampler(interactions, batch_size=16, seed=0)
    assert sampler.epoch == 0
    first = all_batches(sampler)
    assert sampler.epoch == 1
    second = all_batches(sampler)
    assert not np.array_equal(first[0][0], second[0][0])
    sampler.set_epoch(0)
    replay = all_batches(sampler)
    for a, b in zip(first, replay):
        np.testing.assert_array_equal(a[2], b[2])


def test_next_batch_streams_across_epochs(interactions):
    by_epoch = cml_rs.WarpSampler(interactions, batch_size=100, seed=3)
    expected = all_batches(by_epoch) + all_batches(by_epoch)
    stream = cml_rs.WarpSampler(interactions, batch_size=100, seed=3)
    got = [stream.next_batch() for _ in range(len(expected))]
    for a, b in zip(expected, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_a_user_with_every_item_is_named():
    matrix = sp.csr_matrix(np.array([[1, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=np.float32))
    with pytest.raises(ValueError, match="user 1 has all 3 items"):
        cml_rs.WarpSampler(matrix)
    assert len(cml_rs.WarpSampler(matrix, check_negative=False)) == 1


def test_other_sparse_formats_are_converted_with_a_warning(interactions):
    with pytest.warns(UserWarning, match="converting it to CSR"):
        sampler = cml_rs.WarpSampler(interactions.tocoo(), batch_size=16)
    assert sampler.n_pairs == interactions.nnz


def test_duplicate_entries_count_once():
    matrix = sp.csr_matrix((np.ones(3), np.array([1, 1, 2]), np.array([0, 3])), shape=(1, 5))
    assert cml_rs.WarpSampler(matrix).n_pairs == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be at least 1"),
        ({"n_negatives": 0}, ValueError, "n_negatives must be at least 1"),
        ({"seed": -1}, ValueError, "seed must be a non-negative integer, got -1"),
        ({"num_threads": -2}, ValueError, "num_threads must be a non-negative integer, got -2"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an integer"),
        ({"prefetch": 0}, ValueError, "prefetch must be between 1 and 1024 batches, got 0"),
        ({"popularity_exponent": float("nan")}, ValueError, "popularity_exponent must be between 0 and 4"),
        ({"popularity_exponent": -1.0}, ValueError, "popularity_exponent must be between 0 and 4"),
        ({"popularity_exponent": "x"}, TypeError, "popularity_exponent"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank must be below world_size 2, got 2"),
        ({"rank": -1, "world_size": 2}, ValueError, "rank must be a non-negative integer, got -1"),
        ({"world_size": 0}, ValueError, "world_size must be at least 1"),
        ({"world_size": 10**6}, ValueError, "world_size 1000000 exceeds the 300 training pairs"),
    ],
)
def test_bad_arguments(interactions, kwargs, error, message):
    with pytest.raises(error, match=message):
        cml_rs.WarpSampler(interactions, **kwargs)


def test_dense_input_is_a_type_error():
    with pytest.raises(TypeError, match="scipy.sparse matrix"):
        cml_rs.WarpSampler(np.ones((3, 3)))


def test_empty_matrix_is_a_value_error():
    with pytest.raises(ValueError, match="holds no interactions"):
        cml_rs.WarpSampler(sp.csr_matrix((4, 5), dtype=np.float32))


def test_malformed_csr_is_reported():
    matrix = sp.csr_matrix((np.ones(2), np.array([0, 1]), np.array([0, 1, 2])), shape=(2, 3))
    matrix.indptr = np.array([0, 2, 1], dtype=matrix.indptr.dtype)
    with pytest.raises(ValueError, match="indptr decreases at row 1"):
        cml_rs.WarpSampler(matrix)
    matrix = sp.csr_matrix((np.ones(2), np.array([0, 1]), np.array([0, 1, 2])), shape=(2, 3))
    matrix.indices = np.array([0, 7], dtype=matrix.indices.dtype)
    with pytest.raises(IndexError, match="column id 7, outside"):
        cml_rs.WarpSampler(matrix)
    matrix = sp.csr_matrix((np.ones(2), np.array([0, 1]), np.array([0, 1, 2])), shape=(2, 3))
    matrix.indices = np.array([0, -1], dtype=matrix.indices.dtype)
    with pytest.raises(IndexError, match="column id -1"):
        cml_rs.WarpSampler(matrix)


@pytest.mark.timeout(60)
def test_several_python_threads_share_one_stream(interactions):
    expected = Counter()
    reference = cml_rs.WarpSampler(interactions, batch_size=8, seed=4)
    n_batches = 4 * len(reference)
    for _ in range(4):
        for users, positives, _ in reference:
            expected.update(zip(users.tolist(), positives.tolist()))
    shared = cml_rs.WarpSampler(interactions, batch_size=8, seed=4)
    got = Counter()
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(n_batches // 4):
            users, positives, _ = shared.next_batch()
            with lock:
                got.update(zip(users.tolist(), positives.tolist()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_works_in_a_forked_child_after_use(interactions):
    sampler = cml_rs.WarpSampler(interactions, batch_size=16, seed=9, num_threads=2)
    expected_stream = cml_rs.WarpSampler(interactions, batch_size=16, seed=9)
    expected = [expected_stream.next_batch()[2] for _ in range(6)]
    for _ in range(3):
        sampler.next_batch()  # the parent's producer thread and pool are now running
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: continue the stream and run a fresh epoch
        try:
            batches = [sampler.next_batch()[2] for _ in range(3)]
            ok = all(np.array_equal(a, b) for a, b in zip(batches, expected[3:]))
            ok = ok and sum(len(u) for u, _, _ in sampler) == interactions.nnz
            ok = ok and cml_rs.topk_l2(np.ones((2, 3)), np.eye(3), 1, num_threads=2)[0].shape == (2, 1)
            os.write(write_end, b"ok" if ok else b"mismatch")
        finally:
            os._exit(0)
    os.close(write_end)
    message = os.read(read_end, 100)
    os.waitpid(pid, 0)
    assert message == b"ok"
    # The parent's stream is unaffected.
    np.testing.assert_array_equal(sampler.next_batch()[2], expected[3])


def test_pickle_round_trip_keeps_the_epoch(interactions):
    sampler = cml_rs.WarpSampler(interactions, batch_size=16, seed=2)
    all_batches(sampler)
    copy = pickle.loads(pickle.dumps(sampler))
    assert copy.epoch == 1
    for a, b in zip(all_batches(sampler), all_batches(copy)):
        np.testing.assert_array_equal(a[2], b[2])


def test_repr_names_the_sizes(interactions):
    text = repr(cml_rs.WarpSampler(interactions, batch_size=16))
    assert "n_users=50" in text and "n_items=40" in text and "n_pairs=300" in text
