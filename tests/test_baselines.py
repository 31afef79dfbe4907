"""cml_rs.baselines against results computed by hand on tiny matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cml_rs import baselines, evaluation

# 3 users x 4 items: item 0 liked by everyone, item 3 by nobody.
MATRIX = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=np.float32))


def test_popularity_ranks_by_count_then_id_and_skips_liked_items():
    model = baselines.Popularity().fit(MATRIX)
    np.testing.assert_array_equal(model.item_counts_, [3, 2, 2, 0])
    ids, scores = model.recommend(1, MATRIX[1], N=4)
    # user 1 liked 0 and 2: unseen 1 (count 2) then 3 (count 0), then the liked ones last.
    assert ids.tolist() == [1, 3, 0, 2]
    assert scores[:2].tolist() == [2.0, 0.0] and np.all(scores[2:] == np.finfo(np.float32).min)
    ids, _ = model.recommend(1, MATRIX[1], N=4, filter_already_liked_items=False)
    assert ids.tolist() == [0, 1, 2, 3]  # ties (1 and 2, both 2) by id
    assert ids.dtype == np.int32


def test_ease_matches_its_closed_form():
    lam = 0.5
    model = baselines.EASE(regularization=lam).fit(MATRIX)
    x = MATRIX.toarray().astype(np.float64)
    p = np.linalg.inv(x.T @ x + lam * np.eye(4))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(model.item_weights_, b, rtol=1e-4, atol=1e-5)
    # One float32 copy, laid out for scoring (rows @ weights); the fit makes no second one.
    assert model.item_weights_.dtype == np.float32 and model.item_weights_.flags.c_contiguous
    ids, scores = model.recommend(0, MATRIX[0], N=2)
    want = x[0] @ b
    assert ids.tolist() == [int(i) for i in np.argsort(-np.where(x[0] > 0, -np.inf, want), kind="stable")[:2]]
    np.testing.assert_allclose(scores, np.sort(want[x[0] == 0])[::-1], rtol=1e-4)


def test_ease_holds_its_items_by_items_matrix_once(monkeypatch):
    """At 41k items that matrix is 6.7 GB: the fit must not copy it (a second copy was
    there before, in the C-ordered weights made from LAPACK's Fortran-ordered inverse)."""
    import functools
    import tracemalloc

    import scipy.linalg  # noqa: F401  (imported before tracing: a module is not the matrix)

    # The mirroring's blocks are 2048 wide, as large as this whole matrix: shrink them
    # to the share they have of a 41k-item one.
    monkeypatch.setattr(
        baselines, "_mirror_lower_triangle", functools.partial(baselines._mirror_lower_triangle, block=64)
    )
    items = 1500
    train = sp.random(2000, items, density=0.01, random_state=1, format="csr", dtype=np.float32)
    train.data[:] = 1.0
    tracemalloc.start()
    try:
        baselines.EASE(regularization=50.0).fit(train)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense = items * items * 4
    assert peak < 1.8 * dense, f"peak {peak / dense:.2f} x the dense matrix"


def test_ease_on_a_torch_device_matches_lapack():
    train = sp.random(50, 40, density=0.2, random_state=3, format="csr", dtype=np.float32)
    lapack = baselines.EASE(regularization=5.0).fit(train)
    on_torch = baselines.EASE(regularization=5.0, device="cpu").fit(train)
    np.testing.assert_allclose(on_torch.item_weights_.numpy(), lapack.item_weights_, rtol=1e-4, atol=1e-5)
    users = np.arange(50)
    np.testing.assert_allclose(on_torch.scores(users, train).numpy(), lapack.scores(users, train), rtol=1e-4, atol=1e-5)
    ids, _ = on_torch.recommend(users, train, N=5)
    np.testing.assert_array_equal(ids, lapack.recommend(users, train, N=5)[0])


class _FixedScores(baselines.ScoringRecommender):
    """Scores from a fixed matrix, as numpy or as a torch tensor (the device path)."""

    def __init__(self, table: np.ndarray, as_tensor: bool) -> None:
        super().__init__()
        self.table, self.as_tensor = table, as_tensor
        self.n_users, self.n_items = table.shape

    def scores(self, userids, user_rows):
        import torch

        block = self.table[userids].copy()
        return torch.from_numpy(block) if self.as_tensor else block


@pytest.mark.parametrize(
    "options",
    [
        {"N": 5},
        {"N": 30},  # more than there are items
        {"N": 4, "filter_already_liked_items": False},
        {"N": 3, "items": [7, 1, 2, 3, 11, 12, 13]},
        {"N": 6, "filter_items": [0, 4, 5]},
    ],
)
def test_ranking_on_a_device_matches_the_host(options):
    """Device ranking (a stable sort) gives the host's ids and scores, ties to the lower id."""
    rng = np.random.default_rng(0)
    table = rng.integers(0, 3, size=(20, 15)).astype(np.float32)  # mostly ties
    liked = sp.csr_matrix(rng.random((20, 15)) < 0.3, dtype=np.float32)
    users = np.arange(20)
    host = _FixedScores(table, as_tensor=False).recommend(users, liked, **options)
    device = _FixedScores(table, as_tensor=True).recommend(users, liked, **options)
    np.testing.assert_array_equal(device[0], host[0])
    np.testing.assert_array_equal(device[1], host[1])


@pytest.mark.parametrize("device", [None, "cpu"])
def test_ease_names_a_gram_matrix_it_cannot_invert(device):
    # Items 0 and 1 are liked by the same 4 users: their Gram block is [[4, 4], [4, 4]],
    # whose Cholesky pivot is exactly 4 - 2 * 2 = 0, and 1e-10 vanishes beside 4 in float32.
    rows = np.zeros((6, 3), dtype=np.float32)
    rows[:4, :2] = 1.0
    rows[4:, 2] = 1.0
    with pytest.raises(np.linalg.LinAlgError, match="singular in float32.*raise regularization"):
        baselines.EASE(regularization=1e-10, device=device).fit(sp.csr_matrix(rows))
    weights = baselines.EASE(regularization=1.0, device=device).fit(sp.csr_matrix(rows)).item_weights_
    assert np.isfinite(np.asarray(weights)).all()


def test_rp3beta_matches_the_random_walk_by_hand():
    model = baselines.RP3beta(alpha=1.0, beta=0.5, top_k=4, normalize=False).fit(MATRIX)
    x = MATRIX.toarray().astype(np.float64)
    user_to_item = x / x.sum(axis=1, keepdims=True)
    item_degree = x.sum(axis=0)
    item_to_user = x.T / np.maximum(item_degree, 1)[:, None]
    w = (item_to_user @ user_to_item) / np.power(np.maximum(item_degree, 1), 0.5)[None, :]
    np.testing.assert_allclose(model.item_weights_.toarray(), w, rtol=1e-5)
    # top_k = 1 keeps each row's largest weight only; normalised rows sum to one.
    pruned = baselines.RP3beta(alpha=1.0, beta=0.5, top_k=1).fit(MATRIX).item_weights_.toarray()
    assert ((pruned > 0).sum(axis=1) <= 1).all()
    np.testing.assert_allclose(pruned.sum(axis=1)[item_degree > 0], 1.0, rtol=1e-6)


def test_ties_at_the_cut_go_to_the_lower_item():
    # Row 0 has no tie at the cut of 2; row 1 has three items tied for places 2 and 3.
    scores = np.array([[1, 3, 3, 0, 0], [5, 4, 4, 2, 4]], np.float32)
    assert baselines._best_columns(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert baselines._best_columns(scores, 3).tolist() == [[1, 2, 0], [0, 1, 2]]
    scores[1, 0] = -np.inf  # an excluded item ranks last
    assert baselines._best_columns(scores, 5).tolist()[1] == [1, 2, 4, 3, 0]


def test_items_filter_items_and_width():
    model = baselines.Popularity().fit(MATRIX)
    ids, _ = model.recommend([0, 1], MATRIX[[0, 1]], N=10, items=[3, 2])
    assert ids.shape == (2, 2) and set(ids[0].tolist()) == {2, 3}
    ids, _ = model.recommend(0, MATRIX[0], N=10, filter_items=[3])
    assert 3 not in ids.tolist() and len(ids) == 3


def test_baselines_plug_into_ranking_metrics():
    rng = np.random.default_rng(0)
    train = sp.random(40, 30, density=0.2, random_state=1, format="csr", dtype=np.float32)
    train.data[:] = 1
    test = sp.csr_matrix((np.ones(40, np.float32), (np.arange(40), rng.integers(0, 30, 40))), shape=(40, 30))
    test = test - test.multiply(train)
    test.eliminate_zeros()
    for model in (baselines.Popularity(), baselines.EASE(10.0), baselines.RP3beta()):
        result = evaluation.ranking_metrics_at_k(model.fit(train), train, test, K=5)
        # Against a brute-force ranking of the same scores.
        scores = model.scores(np.arange(40), train).astype(np.float64)
        scores[train.toarray() > 0] = -np.inf
        hits = []
        for user in result.per_user["user"]:
            top = np.lexsort((np.arange(30), -scores[user]))[:5]
            hits.append(len(set(top) & set(test[user].indices)) / test[user].nnz)
        assert result["recall"] == pytest.approx(np.mean(hits)), type(model).__name__


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: baselines.EASE(regularization=0), "regularization must be > 0"),
        (lambda: baselines.EASE(regularization=1e20), r"regularization must be <= 1000000000000\.0, got 1e\+20"),
        (lambda: baselines.EASE(device="gpu0"), "device must name a torch device"),
        (lambda: baselines.RP3beta(top_k=0), "top_k must be at least 1"),
        (lambda: baselines.Popularity().fit(sp.csr_matrix((3, 3))), "holds no interactions"),
        (lambda: baselines.Popularity().recommend(0, MATRIX[0]), "not fitted"),
        (lambda: baselines.Popularity().fit(MATRIX).recommend(0, MATRIX), "one row per entry of userid"),
    ],
)
def test_bad_input(make, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        make()
