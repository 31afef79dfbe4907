"""The recommender contract: what every model and retrieval backend of this
package promises, checked on a problem whose answer is known exactly.

In the spirit of implicit's ``RecommenderBaseTestMixin``: users like the items
of their own parity (a checkerboard) except the item with their own id, which
is withheld; a model that learned the structure recommends exactly that item
first. One class states the contract; subclasses run it against CML with each
retrieval backend, and :class:`IndexContract` against each index directly.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

import cml_rs
from cml_rs import evaluation, retrieval

N_USERS = 50


def checkerboard(n: int = N_USERS) -> sp.csr_matrix:
    """User u likes every item of u's parity except item u (withheld for testing)."""
    users, items = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    liked = ((users + items) % 2 == 0) & (users != items)
    return sp.csr_matrix(liked.astype(np.float32))


@pytest.fixture(scope="module")
def board() -> sp.csr_matrix:
    return checkerboard()


@pytest.fixture(scope="module")
def fitted_cml(board) -> cml_rs.CML:
    model = cml_rs.CML(factors=16, epochs=60, batch_size=64, num_threads=2, random_state=0)
    return model.fit(board, show_progress=False)


class RecommenderContract:
    """The contract; a subclass names the model and the retrieval backend."""

    backend = "exact"
    #: Share of users an approximate backend may get wrong on this problem.
    tolerance = 0.0

    @pytest.fixture
    def model(self, fitted_cml):
        return fitted_cml

    def recommend(self, model, *args, **kwargs):
        return model.recommend(*args, backend=self.backend, **kwargs)

    def test_recommends_the_withheld_item_first(self, model, board):
        wrong = []
        for user in range(N_USERS):
            ids, scores = self.recommend(model, user, board[user], N=1)
            assert ids.shape == scores.shape == (1,)
            if ids[0] != user:
                wrong.append((user, int(ids[0])))
        assert len(wrong) <= self.tolerance * N_USERS, wrong

    def test_a_batch_equals_one_user_at_a_time(self, model, board):
        users = np.arange(N_USERS)
        ids, scores = self.recommend(model, users, board[users], N=5)
        assert ids.shape == scores.shape == (N_USERS, 5)
        for user in users:
            one_ids, one_scores = self.recommend(model, user, board[user], N=5)
            np.testing.assert_array_equal(one_ids, ids[user])
            np.testing.assert_allclose(one_scores, scores[user], rtol=1e-6)
        unfiltered, _ = self.recommend(model, users, board[users], N=5, filter_already_liked_items=False)
        for user in users[:5]:
            one, _ = self.recommend(model, user, board[user], N=5, filter_already_liked_items=False)
            np.testing.assert_array_equal(one, unfiltered[user])

    def test_scores_are_minus_squared_distances_best_first(self, model, board):
        ids, scores = self.recommend(model, 3, board[3], N=10)
        assert np.all(scores <= 0) and np.all(np.diff(scores) <= 1e-6)
        want = -((model.user_factors[3] - model.item_factors[ids]) ** 2).sum(axis=1)
        np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)

    def test_liked_and_filtered_items_never_come_back(self, model, board):
        banned = np.arange(0, N_USERS, 5)
        ids, _ = self.recommend(model, np.arange(N_USERS), board, N=10, filter_items=banned)
        for user, row in enumerate(ids):
            row = row[row >= 0]
            assert not set(row.tolist()) & set(banned.tolist())
            assert not set(row.tolist()) & set(board[user].indices.tolist())

    def test_precision_at_one_is_perfect(self, model, board):
        withheld = sp.identity(N_USERS, format="csr", dtype=np.float32)
        result = evaluation.ranking_metrics_at_k(model, board, withheld, K=1)
        assert result["precision"] == 1.0 and result["recall"] == 1.0

    def test_similar_items_share_parity_and_start_with_themselves(self, model):
        ids, scores = model.similar_items(np.arange(10), N=10, backend=self.backend)
        assert ids.shape == (10, 10)
        assert ids[:, 0].tolist() == list(range(10))
        assert np.all((ids % 2) == (np.arange(10)[:, None] % 2))
        np.testing.assert_allclose(scores[:, 0], 0.0, atol=1e-5)

    def test_similar_users_share_parity(self, model):
        ids, _ = model.similar_users(np.arange(10), N=10, backend=self.backend)
        assert ids[:, 0].tolist() == list(range(10))
        assert np.all((ids % 2) == (np.arange(10)[:, None] % 2))

    def test_pickle_and_save_keep_the_answers(self, model, board, tmp_path):
        want, _ = self.recommend(model, np.arange(N_USERS), board, N=3)
        path = tmp_path / "model.npz"
        model.save(path)
        for other in (pickle.loads(pickle.dumps(model)), cml_rs.CML.load(path)):
            got, _ = self.recommend(other, np.arange(N_USERS), board, N=3)
            np.testing.assert_array_equal(got, want)


class TestCMLExact(RecommenderContract):
    backend = "exact"


class TestCMLLsh(RecommenderContract):
    backend = "lsh"
    tolerance = 0.1  # tuned to 95% recall@50, and each user's liked items crowd its probes


class TestCMLHnsw(RecommenderContract):
    backend = "hnsw"
    tolerance = 0.05


def test_fit_accepts_both_float_widths_and_warns_once_for_other_formats(board):
    small = dict(factors=8, epochs=2, num_threads=1)
    a = cml_rs.CML(**small).fit(board.astype(np.float64), show_progress=False)
    b = cml_rs.CML(**small).fit(board.astype(np.float32), show_progress=False)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    with pytest.warns(UserWarning, match="COO matrix; converting it to CSR"):
        cml_rs.CML(**small).fit(board.tocoo(), show_progress=False)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    """Two well-separated clusters of 100 points: each point's neighbours are its cluster."""
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0.0, 0.01, (100, 4)), rng.normal(1.0, 0.01, (100, 4))])
    return points.astype(np.float32)


class IndexContract:
    """What every nearest-neighbour index behind ``build_index`` promises."""

    backend = "exact"

    @pytest.fixture
    def index(self, vectors):
        return retrieval.build_index(self.backend, vectors, seed=0)

    def test_finds_the_exact_neighbours(self, index, vectors):
        ids, sqdist = index.query(vectors[:10], 5)
        truth, _ = cml_rs.topk_l2(vectors[:10], vectors, 5)
        assert ids.dtype == np.int64 and sqdist.dtype == np.float32
        assert retrieval.neighbour_recall(ids, truth) >= 0.9
        assert ids[:, 0].tolist() == list(range(10))
        np.testing.assert_allclose(sqdist[:, 0], 0.0, atol=1e-6)

    def test_skips_excluded_ids_and_pads_when_short(self, index, vectors):
        exclude = sp.csr_matrix(np.ones((1, len(vectors)), dtype=np.float32))
        exclude[0, 7] = 0
        exclude.eliminate_zeros()
        ids, sqdist = index.query(vectors[7], 3, exclude=exclude)
        assert ids.tolist() == [7, -1, -1] and np.isinf(sqdist[1:]).all()

    def test_a_single_query_gives_one_row(self, index, vectors):
        ids, sqdist = index.query(vectors[150], 4)
        assert ids.shape == sqdist.shape == (4,) and ids[0] == 150
        assert np.all(ids >= 100)

    def test_reports_its_memory(self, index, vectors):
        assert index.memory_bytes() >= vectors.nbytes


class TestExactIndex(IndexContract):
    backend = "exact"


class TestLshIndex(IndexContract):
    backend = "lsh"


class TestHnswIndex(IndexContract):
    backend = "hnsw"


def test_neighbour_recall_by_hand():
    truth = np.array([[1, 2, 3], [4, 5, -1]])
    found = np.array([[3, 9, 1], [5, 4, 8]])
    assert retrieval.neighbour_recall(found, truth) == pytest.approx(4 / 5)
    assert retrieval.neighbour_recall(found, np.full((2, 3), -1)) == 1.0


# ---------------------------------------------------------------------------
# The rest of implicit's recommender contract: code written for
# implicit.als.AlternatingLeastSquares runs unchanged on cml_rs.CML.


def test_ids_are_int32_and_scores_float32_like_implicit(fitted_cml, board):
    ids, scores = fitted_cml.recommend(np.arange(5), board[:5], N=3)
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    for call in (fitted_cml.similar_items(0), fitted_cml.similar_users(0)):
        assert call[0].dtype == np.int32


def test_implicit_evaluation_accepts_the_model(fitted_cml, board):
    implicit_evaluation = pytest.importorskip("implicit.evaluation")
    withheld = sp.identity(N_USERS, format="csr", dtype=np.float32)
    assert implicit_evaluation.precision_at_k(fitted_cml, board, withheld, K=1, show_progress=False) == 1.0
    # implicit's precision divides by min(K, held-out items): 1 here, as the hit is always found.
    metrics = implicit_evaluation.ranking_metrics_at_k(fitted_cml, board, withheld, K=5, show_progress=False)
    assert metrics["precision"] == 1.0 and metrics["map"] == 1.0


def test_nothing_is_ever_padded(fitted_cml, board):
    # More than there are: every item once, the user's liked ones last at the lowest score.
    ids, scores = fitted_cml.recommend(0, board[0], N=10_000)
    assert sorted(ids.tolist()) == list(range(N_USERS))
    liked = set(board[0].indices.tolist())
    assert set(ids[-len(liked) :].tolist()) == liked
    assert np.all(scores[-len(liked) :] == np.finfo(np.float32).min)
    assert np.all(np.diff(scores) <= 0)
    # A subset of 6 items with N = 20: 6 entries, liked ones (2, 4, 6 for user 0) last.
    selected = np.array([1, 2, 3, 4, 5, 6])
    ids, _ = fitted_cml.recommend(0, board[0], N=20, items=selected)
    assert len(ids) == 6 and set(ids.tolist()) == set(selected.tolist())
    assert set(ids[3:].tolist()) == {2, 4, 6}
    # A batch: every row has the same, full width.
    ids, _ = fitted_cml.recommend(np.arange(N_USERS), board, N=20, items=np.arange(0, 30, 3))
    assert ids.shape == (N_USERS, 10) and (ids >= 0).all()
    # Filtered items are never returned, even when that leaves fewer than N.
    ids, _ = fitted_cml.recommend(0, board[0], N=100, filter_items=np.arange(10))
    assert len(ids) == N_USERS - 10 and ids.min() >= 10


def test_recalculate_user_folds_a_row_in_without_changing_the_model(fitted_cml, board):
    before = fitted_cml.user_factors
    stored, _ = fitted_cml.recommend(np.arange(N_USERS), board, N=1)
    recalculated, _ = fitted_cml.recommend(np.arange(N_USERS), board, N=1, recalculate_user=True)
    assert (recalculated[:, 0] == stored[:, 0]).mean() >= 0.95
    np.testing.assert_array_equal(fitted_cml.user_factors, before)
    # A user the model has never seen: liking the even items, it gets an even item.
    newcomer = sp.csr_matrix(np.isin(np.arange(N_USERS), np.arange(2, N_USERS, 2))[None, :].astype(np.float32))
    ids, _ = fitted_cml.recommend(N_USERS + 7, newcomer, N=1, recalculate_user=True)
    assert ids[0] == 0  # the one even item it has not liked


def test_recalculate_item_and_similar_items(fitted_cml, board):
    item_users = board.T.tocsr()
    stored, _ = fitted_cml.similar_items(np.arange(10), N=5)
    again, _ = fitted_cml.similar_items(np.arange(10), N=5, recalculate_item=True, item_users=item_users[:10])
    assert np.all((again % 2) == (np.arange(10)[:, None] % 2))
    assert np.mean([len(set(a) & set(b)) for a, b in zip(stored, again)]) >= 3


def test_partial_fit_grows_the_model_with_implicits_semantics(board):
    model = cml_rs.CML(factors=16, epochs=60, batch_size=64, num_threads=2, random_state=0).fit(
        board, show_progress=False
    )
    untouched = model.user_factors[1:].copy()
    # User 0 changes its mind (now odd items), and two new users arrive.
    odd = sp.csr_matrix((np.arange(N_USERS) % 2 == 1)[None, :].astype(np.float32))
    even = sp.csr_matrix((np.arange(N_USERS) % 2 == 0)[None, :].astype(np.float32))
    model.partial_fit_users([0, N_USERS + 1, N_USERS], sp.vstack([odd, odd, even]).tocsr())
    assert model.n_users == N_USERS + 2
    np.testing.assert_array_equal(model.user_factors[1:N_USERS], untouched)
    near, _ = model.similar_users([0, N_USERS, N_USERS + 1], N=5)
    assert near[:, 0].tolist() == [0, N_USERS, N_USERS + 1]  # each itself first, then its kind
    likes_odd = {u for u in range(N_USERS + 2) if u % 2 == 1} | {0}
    assert set(near[0, 1:].tolist()) <= likes_odd and set(near[2, 1:].tolist()) <= likes_odd
    assert not set(near[1, 1:].tolist()) & likes_odd
    # A new item liked by the even users lands among the even items.
    even_users = (np.arange(N_USERS + 2) % 2 == 0) & ~np.isin(np.arange(N_USERS + 2), [0, N_USERS + 1])
    liked_by_even = sp.csr_matrix(even_users[None, :].astype(np.float32))  # users 0 and 51 like odd items now
    model.partial_fit_items([N_USERS], liked_by_even)
    assert model.n_items == N_USERS + 1
    near, _ = model.similar_items(N_USERS, N=6)
    assert near[0] == N_USERS and np.all(near[1:] % 2 == 0)


def test_fold_in_draws_positives_by_their_values_as_the_fit_does(fitted_cml):
    # A newcomer whose even items carry weight 3 and odd items 0 (known, never drawn):
    # folded in like the fit trains, it is pulled to the even items only; a binary model
    # draws both halves alike and lands between them.
    items = np.arange(2, N_USERS)
    values = np.where(items % 2 == 0, 3.0, 0.0).astype(np.float32)
    row = sp.csr_matrix((values, (np.zeros(len(items), dtype=np.int64), items)), shape=(1, N_USERS))
    gaps = {}
    for binary in (False, True):
        model = pickle.loads(pickle.dumps(fitted_cml))
        model.binary = binary
        model.partial_fit_users([N_USERS], row)
        distances = ((model.item_factors - model.user_factors[N_USERS]) ** 2).sum(axis=1)
        gaps[binary] = distances[3::2].mean() / distances[2::2].mean()
        if not binary:
            ids, _ = model.recommend(N_USERS, row, N=1)
            assert ids[0] == 0  # the one even item it has not stored
    assert gaps[False] > 1.5 and gaps[True] < 1.2


def test_fold_in_of_rows_whose_values_are_all_zero_keeps_their_centroid(fitted_cml):
    model = pickle.loads(pickle.dumps(fitted_cml))
    row = sp.csr_matrix((np.zeros(3, np.float32), ([0, 0, 0], [2, 4, 6])), shape=(1, N_USERS))
    model.partial_fit_users([N_USERS], row)
    np.testing.assert_allclose(model.user_factors[N_USERS], model.item_factors[[2, 4, 6]].mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("side", ["users", "items"])
def test_fold_in_refuses_negative_values(fitted_cml, side):
    row = sp.csr_matrix(np.where(np.arange(N_USERS) == 4, -1.0, 0.0)[None, :].astype(np.float32))
    name = "user_items" if side == "users" else "item_users"
    with pytest.raises(ValueError, match=f"{name} holds negative values"):
        getattr(fitted_cml, f"partial_fit_{side}")([0], row)


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        ([N_USERS + 1], IndexError, "skips ahead: the model has 50 users, so new ids must be 50"),
        ([-1], IndexError, "userids -1 is negative"),
        ([3, 3], ValueError, "holds an id more than once"),
        ([0.5], TypeError, "userids must hold integer ids"),
    ],
)
def test_partial_fit_rejects_bad_ids(fitted_cml, board, ids, error, message):
    with pytest.raises(error, match=message):
        fitted_cml.partial_fit_users(ids, board[: len(ids)])


def test_implicits_argument_order(fitted_cml, board):
    # recommend(userid, user_items, N, filter_already_liked_items, filter_items, recalculate_user, items)
    ids, _ = fitted_cml.recommend(0, board[0], 5, True, [0, 2], False, None)
    assert len(ids) == 5 and not {0, 2} & set(ids.tolist())
    # similar_items(itemid, N, recalculate_item, item_users, filter_items, items)
    ids, _ = fitted_cml.similar_items(4, 5, False, None, [6, 8])
    assert ids[0] == 4 and not {6, 8} & set(ids.tolist())
    ids, _ = fitted_cml.similar_items(4, 3, False, None, None, [1, 4, 9])
    assert sorted(ids.tolist()) == [1, 4, 9] and ids[0] == 4
    # similar_users(userid, N, filter_users, users)
    ids, _ = fitted_cml.similar_users(2, 5, [4, 6])
    assert ids[0] == 2 and not {4, 6} & set(ids.tolist())
    ids, _ = fitted_cml.similar_users(2, 10, None, [2, 3, 4])
    assert len(ids) == 3 and ids[0] == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, b: m.recommend(0, b), r"user_items must hold one row per entry of userid \(1\), got 50 rows"),
        (lambda m, b: m.recommend(0, b[0].tocoo()), "user_items must be a CSR matrix, got a COO matrix"),
        (lambda m, b: m.recommend(0, b[0].tocsc()), "user_items must be a CSR matrix, got a CSC matrix"),
        (lambda m, b: m.recommend(0, b[0], items=[1], filter_items=[2]), "either items .* or filter_items"),
        (lambda m, b: m.similar_items(0, items=[1], filter_items=[2]), "either items .* or filter_items"),
        (lambda m, b: m.similar_users(0, users=[1], filter_users=[2]), "either users .* or filter_users"),
        (lambda m, b: m.similar_items(0, recalculate_item=True), "item_users must be a CSR matrix, got NoneType"),
    ],
)
def test_input_checks_as_strict_as_implicits(fitted_cml, board, call, message):
    with pytest.raises(ValueError, match=message):
        call(fitted_cml, board)


def test_save_and_load_like_implicit(fitted_cml, tmp_path):
    fitted_cml.save(tmp_path / "model")  # no suffix: .npz is added, and load finds it
    assert (tmp_path / "model.npz").exists()
    back = cml_rs.CML.load(tmp_path / "model")
    np.testing.assert_array_equal(back.item_factors, fitted_cml.item_factors)
    with open(tmp_path / "in-a-file.npz", "wb+") as handle:
        fitted_cml.save(handle)
        handle.seek(0)
        from_handle = cml_rs.CML.load(handle)
    np.testing.assert_array_equal(from_handle.similar_items(1)[0], fitted_cml.similar_items(1)[0])
    unfitted = cml_rs.CML(factors=7, margin=0.9)
    unfitted.save(tmp_path / "unfitted.npz")
    again = cml_rs.CML.load(tmp_path / "unfitted.npz")
    assert not again.fitted and again.hyperparameters() == unfitted.hyperparameters()
    assert pickle.loads(pickle.dumps(unfitted)).hyperparameters() == unfitted.hyperparameters()


@pytest.mark.parametrize(
    "callback",
    [
        lambda iteration, elapsed: None,  # implicit's LMF
        lambda iteration, elapsed, loss: None,  # implicit's ALS
        lambda epoch, elapsed, correct, skipped: None,  # implicit's BPR
        lambda *args, **kwargs: None,
    ],
    ids=["2 args", "3 args", "4 args", "*args"],
)
def test_fit_takes_implicits_callbacks(board, callback):
    calls = []

    def recording(*args):
        calls.append(args)
        return callback(*args)

    recording.__signature__ = __import__("inspect").signature(callback)
    cml_rs.CML(factors=8, epochs=3, num_threads=1).fit(board, show_progress=False, callback=recording)
    assert len(calls) == 3 and all(len(args) == min(4, len(args)) for args in calls)
    assert calls[0][0] == 0 and calls[0][1] >= 0


def test_without_validation_training_stops_when_the_loss_stops_falling(capsys):
    board = checkerboard(256)
    model = cml_rs.CML(factors=16, num_threads=2)  # 200 epochs at most
    model.fit(board, show_progress=True)
    assert len(model.history_) < 100
    losses = [h["loss"] for h in model.history_]
    assert losses[-1] < 0.5 * losses[0]
    assert "no validation: stops when the loss falls < 1.0%" in capsys.readouterr().err
    withheld = sp.identity(256, format="csr", dtype=np.float32)
    assert evaluation.ranking_metrics_at_k(model, board, withheld, K=1)["precision"] >= 0.95


def test_confidence_weights_matter_and_binary_switches_them_off(board):
    counts = board.copy()
    counts.data = np.random.default_rng(0).integers(1, 1000, counts.nnz).astype(np.float32)
    options = dict(factors=8, epochs=2, num_threads=1)
    weighted = cml_rs.CML(**options).fit(counts, show_progress=False)
    binary = cml_rs.CML(**options, binary=True).fit(counts, show_progress=False)
    plain = cml_rs.CML(**options).fit(board, show_progress=False)
    np.testing.assert_array_equal(binary.item_factors, plain.item_factors)
    assert not np.array_equal(weighted.item_factors, plain.item_factors)
    negative = board.copy()
    negative.data[3] = -1.0
    with pytest.raises(ValueError, match="negative values"):
        cml_rs.CML(**options).fit(negative, show_progress=False)
    with pytest.raises(ValueError, match="negative values"):
        cml_rs.CML(**options, binary=True).fit(negative, show_progress=False)
