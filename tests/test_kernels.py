"""rank_weights, topk_l2 and sqdist against numpy/torch references, and their bad-input branches."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cml_rs
from cml_rs.nn import rank_weights_torch


def rank_weights_reference(pos, neg, margin, n_items):
    hinge = margin + pos[:, None] - neg
    impostors = (hinge > 0).sum(1)
    rank = (n_items * impostors) // neg.shape[1]
    return np.log(rank + 1.0), np.argmin(neg, axis=1)


def test_rank_weights_match_the_spec_and_torch():
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 2, 5000).astype(np.float32)
    neg = rng.uniform(0, 4, (5000, 20)).astype(np.float32)
    weights, hardest = cml_rs.rank_weights(pos, neg, margin=0.5, n_items=25975)
    want_w, want_h = rank_weights_reference(pos, neg, 0.5, 25975)
    assert weights.dtype == np.float32 and hardest.dtype == np.int64
    np.testing.assert_allclose(weights, want_w, rtol=1e-6)
    np.testing.assert_array_equal(hardest, want_h)
    assert (weights == 0).any() and (weights > 7.2).any()
    torch_w, torch_h = rank_weights_torch(torch.from_numpy(pos), torch.from_numpy(neg), 0.5, 25975)
    np.testing.assert_allclose(torch_w.numpy(), weights, rtol=1e-6)
    np.testing.assert_array_equal(torch_h.numpy(), hardest)


def test_rank_weights_thread_count_does_not_matter():
    rng = np.random.default_rng(1)
    pos = rng.uniform(0, 2, 20000).astype(np.float32)
    neg = rng.uniform(0, 4, (20000, 20)).astype(np.float32)
    one = cml_rs.rank_weights(pos, neg, 0.5, 1000, num_threads=1)
    many = cml_rs.rank_weights(pos, neg, 0.5, 1000, num_threads=4)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


@pytest.mark.parametrize(
    ("pos", "neg", "n_items", "error", "message"),
    [
        (np.ones(3), np.ones((4, 2)), 10, ValueError, "pos_dist has 3 entries but neg_dist has 4 rows"),
        (np.ones(3), np.ones((3, 0)), 10, ValueError, "neg_dist has no columns"),
        (np.ones(3), np.ones(3), 10, ValueError, "neg_dist must be 2-D"),
        (np.ones((3, 1)), np.ones((3, 2)), 10, ValueError, "pos_dist must be 1-D"),
        (np.array([1.0, np.nan, 1.0]), np.ones((3, 2)), 10, ValueError, r"pos_dist\[1, 0\] is NaN"),
        (np.ones(3), np.full((3, 2), np.inf), 10, ValueError, r"neg_dist\[0, 0\] is inf"),
        (np.ones(3), np.ones((3, 2)), 0, ValueError, "n_items must be at least 1"),
        (np.ones(3), np.array([["a", "b"]] * 3), 10, TypeError, "must hold real numbers"),
    ],
)
def test_rank_weights_bad_input(pos, neg, n_items, error, message):
    with pytest.raises(error, match=message):
        cml_rs.rank_weights(pos, neg, 0.5, n_items)


def reference_topk(queries, items, k, exclude=None):
    dist = ((queries[:, None, :].astype(np.float64) - items[None].astype(np.float64)) ** 2).sum(-1)
    if exclude is not None:
        dist[exclude.toarray() > 0] = np.inf
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)


def assert_topk_equal(ids, dist, want_ids, want_dist):
    """Equal up to ties: distances match, and ids match wherever distances are distinct."""
    finite = np.isfinite(want_dist)
    np.testing.assert_allclose(dist[finite], want_dist[finite], rtol=1e-5, atol=1e-5)
    assert (ids[~finite] == -1).all() and np.isinf(dist[~finite]).all()
    mismatch = ids != np.where(finite, want_ids, -1)
    assert (np.abs(dist[mismatch] - want_dist[mismatch]) < 1e-5).all()


@pytest.mark.parametrize("dim", [1, 3, 17, 100])
def test_topk_equals_a_float64_reference(dim):
    rng = np.random.default_rng(dim)
    queries = rng.standard_normal((37, dim)).astype(np.float32)
    items = rng.standard_normal((1000, dim)).astype(np.float32)
    ids, dist = cml_rs.topk_l2(queries, items, 25)
    assert ids.shape == dist.shape == (37, 25)
    assert ids.dtype == np.int64 and dist.dtype == np.float32
    assert_topk_equal(ids, dist, *reference_topk(queries, items, 25))


def test_topk_excludes_seen_items_and_pads():
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    items = rng.standard_normal((30, 8)).astype(np.float32)
    dense = (rng.uniform(size=(6, 30)) < 0.5).astype(np.float32)
    dense[5] = 1.0
    dense[5, [3, 7]] = 0.0  # query 5 may only get items 3 and 7
    exclude = sp.csr_matrix(dense)
    ids, dist = cml_rs.topk_l2(queries, items, 20, exclude=exclude)
    assert_topk_equal(ids, dist, *reference_topk(queries, items, 20, exclude))
    for q in range(6):
        assert not set(ids[q][ids[q] >= 0].tolist()) & set(np.flatnonzero(dense[q]).tolist())
    assert sorted(ids[5][:2].tolist()) == [3, 7]
    assert (ids[5][2:] == -1).all() and np.isinf(dist[5][2:]).all()


def test_k_beyond_the_catalogue_ranks_every_item_once():
    ids, dist = cml_rs.topk_l2(np.zeros((1, 2)), np.eye(2), 5)
    assert ids.shape == dist.shape == (1, 2)  # min(k, n_items) columns
    assert sorted(ids[0].tolist()) == [0, 1] and np.isfinite(dist).all()
    ids, _ = cml_rs.topk_l2(np.zeros((1, 2)), np.eye(2), 2**62)  # no huge allocation
    assert ids.shape == (1, 2)


def test_one_query_gives_one_dimensional_results_and_float64_is_converted():
    items = np.eye(4)
    ids, dist = cml_rs.topk_l2(np.array([0.0, 0.9, 0.0, 0.0]), items, 2)
    assert ids.shape == (2,) and ids[0] == 1
    np.testing.assert_allclose(dist[0], 0.01, rtol=1e-5)


def test_topk_results_do_not_depend_on_threads():
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    items = rng.standard_normal((50000, 16)).astype(np.float32)
    one = cml_rs.topk_l2(queries, items, 10, num_threads=1)
    many = cml_rs.topk_l2(queries, items, 10, num_threads=4)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


def test_ties_resolve_by_id():
    items = np.ones((10, 3), dtype=np.float32)
    ids, _ = cml_rs.topk_l2(np.zeros((1, 3)), items, 4)
    assert ids[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("queries", "items", "k", "error", "message"),
    [
        (np.ones((2, 3)), np.ones((4, 5)), 1, ValueError, "queries must have 5 columns"),
        (np.ones((2, 3)), np.ones((4, 3)), 0, ValueError, "k must be at least 1"),
        (np.ones((2, 3)), np.ones((4, 3)), 1.5, TypeError, "k must be an integer"),
        (np.full((2, 3), np.nan), np.ones((4, 3)), 1, ValueError, r"queries\[0, 0\] is NaN"),
        (np.ones((2, 3)), np.full((4, 3), -np.inf), 1, ValueError, r"items\[0, 0\] is -inf"),
        (np.ones((2, 3)), np.ones((0, 3)), 1, ValueError, "nothing to search"),
        (np.ones((2, 0)), np.ones((4, 0)), 1, ValueError, "no columns"),
        (np.ones((2, 3, 1)), np.ones((4, 3)), 1, ValueError, "must be 2-D"),
        ("abc", np.ones((4, 3)), 1, TypeError, "must hold real numbers"),
        (np.ones((2, 3)), sp.eye(3).tocsr(), 1, TypeError, "dense array"),
    ],
)
def test_topk_bad_input(queries, items, k, error, message):
    with pytest.raises(error, match=message):
        cml_rs.topk_l2(queries, items, k)


def test_topk_bad_exclude():
    queries, items = np.ones((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match="exclude has 3 rows but there are 2 queries"):
        cml_rs.topk_l2(queries, items, 1, exclude=sp.csr_matrix((3, 4)))
    with pytest.raises(ValueError, match="exclude has 5 columns but there are only 4 items"):
        cml_rs.topk_l2(queries, items, 1, exclude=sp.csr_matrix((2, 5)))
    with pytest.raises(TypeError, match="scipy.sparse"):
        cml_rs.topk_l2(queries, items, 1, exclude=np.zeros((2, 4)))
    broken = sp.csr_matrix((np.ones(1), np.array([1]), np.array([0, 1, 1])), shape=(2, 4))
    broken.indices = np.array([9], dtype=broken.indices.dtype)
    with pytest.raises(IndexError, match="exclude row 0 holds column id 9"):
        cml_rs.topk_l2(queries, items, 1, exclude=broken)


def test_sqdist_equals_numpy():
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((33, 10)).astype(np.float32)
    items = rng.standard_normal((71, 10)).astype(np.float32)
    want = ((queries[:, None] - items[None]) ** 2).sum(-1)
    np.testing.assert_allclose(cml_rs.sqdist(queries, items), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"queries must have 5 columns \(the item dimension\), got 10"):
        cml_rs.sqdist(queries, items[:, :5])


@pytest.mark.timeout(120)
def test_long_calls_release_the_gil():
    rng = np.random.default_rng(6)
    queries = rng.standard_normal((2000, 64)).astype(np.float32)
    items = rng.standard_normal((200000, 64)).astype(np.float32)
    counter = [0]
    done = threading.Event()

    def busy() -> None:
        while not done.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=busy)
    spinner.start()
    try:
        before = counter[0]
        start = time.perf_counter()
        cml_rs.topk_l2(queries, items, 10, num_threads=1)
        elapsed = time.perf_counter() - start
        during = counter[0] - before
    finally:
        done.set()
        spinner.join()
    assert elapsed > 0.1, "the call must be long enough to observe"
    # A Python thread spinning for the whole call makes hundreds of thousands of steps;
    # with the GIL held it would make almost none.
    assert during > 10000, during
