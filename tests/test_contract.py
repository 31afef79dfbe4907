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
