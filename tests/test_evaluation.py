"""ranking_metrics_at_k and list_metrics against brute-force and hand-computed references, and their inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import REPO_ROOT, random_interactions

import cml_rs
from cml_rs import datasets, evaluation


def reference(users, items, train, test, k, exclude=None):
    dist = ((users[:, None, :].astype(np.float64) - items[None]) ** 2).sum(-1)
    dist[train.toarray() > 0] = np.inf
    if exclude is not None:
        dist[exclude.toarray() > 0] = np.inf
    out = {"recall": [], "precision": [], "ndcg": [], "map": []}
    for u in range(len(users)):
        held = set(test[u].indices.tolist())
        if not held:
            continue
        top = np.argsort(dist[u], kind="stable")[:k]
        hits = np.array([i in held for i in top], dtype=float)
        out["recall"].append(hits.sum() / len(held))
        out["precision"].append(hits.sum() / k)
        discounts = 1 / np.log2(np.arange(2, k + 2))
        out["ndcg"].append((hits * discounts).sum() / discounts[: min(k, len(held))].sum())
        precisions = np.cumsum(hits) / np.arange(1, k + 1)
        out["map"].append((precisions * hits).sum() / min(k, len(held)))
    return {name: np.mean(values) for name, values in out.items()}


def random_case(n_users: int = 60, n_items: int = 80, dim: int = 6, seed: int = 0):
    """A paper split of random interactions, and random user and item vectors to rank with."""
    rng = np.random.default_rng(seed)
    split = datasets.split_paper(random_interactions(n_users=n_users, n_items=n_items, per_user=10, seed=seed + 1))
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    items = rng.standard_normal((n_items, dim)).astype(np.float32)
    return split, users, items


def test_metrics_match_a_brute_force_reference():
    split, users, items = random_case()
    for k in (5, 20):
        got = evaluation.ranking_metrics_at_k((users, items), split.train, split.test, K=k, exclude=split.validation)
        want = reference(users, items, split.train, split.test, k, exclude=split.validation)
        for name in ("recall", "precision", "ndcg", "map"):
            assert got[name] == pytest.approx(want[name], rel=1e-9), (k, name)
        assert got["users"] == 60 and len(got.per_user["recall"]) == 60
        assert got.k == k and "recall@" in repr(got)


def test_perfect_model_scores_one_and_exclusion_matters():
    n = 10
    items = np.eye(n, dtype=np.float32)
    users = np.eye(n, dtype=np.float32)  # user u sits on item u
    test = sp.identity(n, format="csr", dtype=np.float32)
    empty = sp.csr_matrix((n, n), dtype=np.float32)
    perfect = evaluation.ranking_metrics_at_k((users, items), empty, test, K=1)
    assert perfect["recall"] == 1.0 and perfect["ndcg"] == 1.0 and perfect["map"] == 1.0
    excluded = evaluation.ranking_metrics_at_k((users, items), test, test, K=1)
    assert excluded["recall"] == 0.0


def test_only_users_with_held_out_items_count_and_subsets():
    data = random_interactions(n_users=20, n_items=30, per_user=5, seed=2)
    test = data.copy().tolil()
    test[:10] = 0
    test = test.tocsr()
    factors = (np.ones((20, 2), np.float32), np.random.default_rng(0).random((30, 2)).astype(np.float32))
    result = evaluation.ranking_metrics_at_k(factors, sp.csr_matrix((20, 30)), test, K=5)
    assert result["users"] == 10 and set(result.per_user["user"].tolist()) == set(range(10, 20))
    subset = evaluation.ranking_metrics_at_k(factors, sp.csr_matrix((20, 30)), test, K=5, users=[0, 12, 15])
    assert subset.per_user["user"].tolist() == [12, 15]
    with pytest.raises(IndexError, match="users 25 is out of range"):
        evaluation.ranking_metrics_at_k(factors, sp.csr_matrix((20, 30)), test, K=5, users=[25])


def test_compare_runs_paired_tests():
    rng = np.random.default_rng(1)
    per_user = {"user": np.arange(200), "recall": rng.random(200), "precision": rng.random(200)}
    per_user.update(ndcg=rng.random(200), map=rng.random(200))
    better = {**per_user, "recall": per_user["recall"] + 0.1 + rng.normal(0, 0.01, 200)}
    a, b = evaluation.RankingMetrics(10, better), evaluation.RankingMetrics(10, per_user)
    result = evaluation.compare(a, b)
    assert result["mean_difference"] == pytest.approx(0.1, abs=0.005)
    assert result["wilcoxon_p"] < 1e-6 and result["ttest_p"] < 1e-6
    assert evaluation.compare(b, b)["wilcoxon_p"] == 1.0
    with pytest.raises(ValueError, match="metric must be"):
        evaluation.compare(a, b, metric="auc")


def test_bad_inputs():
    factors = (np.ones((3, 2)), np.ones((4, 2)))
    good = sp.csr_matrix((3, 4))
    with pytest.raises(ValueError, match=r"test has shape \(3, 5\) but the factors give 3 users x 4 items"):
        evaluation.ranking_metrics_at_k(factors, good, sp.csr_matrix((3, 5)))
    with pytest.raises(TypeError, match="fitted model"):
        evaluation.ranking_metrics_at_k("model", good, good)
    with pytest.raises(ValueError, match="item_factors must have 2 columns"):
        evaluation.ranking_metrics_at_k((np.ones((3, 2)), np.ones((4, 3))), good, good)
    with pytest.raises(ValueError, match="K must be at least 1"):
        evaluation.ranking_metrics_at_k(factors, good, good, K=0)


def test_list_metrics_of_the_exact_top_k_equal_ranking_metrics():
    # Lists made elsewhere (here: the exact top-K, with train and validation excluded) score
    # as ranking_metrics_at_k scores the same rankings, per user and in the means.
    split, users, items = random_case(n_users=50, n_items=70, dim=5, seed=3)
    seen = split.train + split.validation
    ids, _ = cml_rs.topk_l2(users, items, 10, exclude=seen)
    want = evaluation.ranking_metrics_at_k((users, items), split.train, split.test, K=10, exclude=split.validation)
    got = evaluation.list_metrics(ids, split.test)
    for name in ("recall", "precision", "ndcg", "map", "users"):
        assert got[name] == pytest.approx(want[name], rel=1e-12), name
    np.testing.assert_array_equal(got.per_user["user"], want.per_user["user"])
    # A subset of users in any order: each list is scored for the user it names.
    order = np.array([7, 2, 30])
    subset = evaluation.list_metrics(ids[order], split.test, users=order)
    np.testing.assert_array_equal(subset.per_user["user"], order)
    position = {u: i for i, u in enumerate(want.per_user["user"])}
    np.testing.assert_allclose(subset.per_user["ndcg"], want.per_user["ndcg"][[position[u] for u in order]])


def test_list_metrics_by_hand_and_its_inputs():
    test = sp.csr_matrix(np.array([[1, 1, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32))
    # User 0 finds items 1 and 4 at ranks 1 and 3 of 3; user 1 finds item 2 at rank 1 of a
    # list padded with -1; user 2 has nothing held out, so its list is not scored.
    ids = np.array([[1, 3, 4], [2, -1, -1], [0, 1, 2]])
    got = evaluation.list_metrics(ids, test)
    assert got.k == 3 and got["users"] == 2
    np.testing.assert_allclose(got.per_user["recall"], [2 / 3, 1.0])
    np.testing.assert_allclose(got.per_user["precision"], [2 / 3, 1 / 3])
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    np.testing.assert_allclose(got.per_user["ndcg"], [(1 + 1 / np.log2(4)) / ideal, 1.0])
    np.testing.assert_allclose(got.per_user["map"], [(1 + 2 / 3) / 3, 1.0])
    with pytest.raises(ValueError, match="2-D array"):
        evaluation.list_metrics(ids[0], test)
    with pytest.raises(TypeError, match="ids must hold integer ids"):
        evaluation.list_metrics(ids + 0.5, test)
    with pytest.raises(IndexError, match="ids holds item 5"):
        evaluation.list_metrics(np.array([[0, 5]]), test)
    with pytest.raises(IndexError, match="ids holds item -2"):
        evaluation.list_metrics(np.array([[0, -2]]), test)
    with pytest.raises(ValueError, match="ids row 1 lists an item twice"):
        evaluation.list_metrics(np.array([[0, -1, -1], [1, 2, 1]]), test)
    with pytest.raises(ValueError, match="empty lists"):
        evaluation.list_metrics(np.zeros((2, 0), dtype=int), test)
    with pytest.raises(ValueError, match="test only 3 users; pass users"):
        evaluation.list_metrics(np.zeros((4, 1), dtype=int), test)
    with pytest.raises(ValueError, match="users has 1 ids but ids has 3 rows"):
        evaluation.list_metrics(ids, test, users=[0])
    with pytest.raises(ValueError, match="users names a user twice"):
        evaluation.list_metrics(ids[:2], test, users=[1, 1])
    with pytest.raises(IndexError, match="users 3 is out of range"):
        evaluation.list_metrics(ids[:1], test, users=[3])


def test_paired_pvalues_match_the_exact_signed_rank_distribution():
    # Five positive differences of distinct sizes: the signed-rank statistic takes its
    # most extreme value, which 1 of the 2^5 sign patterns reaches on each side, so the
    # exact two-sided p is 2/32.
    before = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    after = before + np.array([0.01, 0.02, 0.03, 0.04, 0.05])
    assert evaluation.paired_pvalues(after, before)["wilcoxon_p"] == pytest.approx(2 / 32)
    assert evaluation.paired_pvalues(before, before) == {"wilcoxon_p": 1.0, "ttest_p": 1.0}
    with pytest.raises(ValueError, match="same length"):
        evaluation.paired_pvalues(before, before[:4])
    with pytest.raises(ValueError, match="1-D"):
        evaluation.paired_pvalues(np.stack([before, after]), np.stack([after, before]))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        evaluation.paired_pvalues(before[:1], after[:1])
    with pytest.raises(ValueError, match="finite"):
        evaluation.paired_pvalues(before, np.array([0.1, np.nan, 0.3, 0.4, 0.5]))


def test_the_benchmarks_recall_of_id_lists_counts_hits_by_hand(monkeypatch):
    # benches/_common.recall_of_lists scores lists that a recommend call returned (fold-in
    # runs); -1 pads a short list and is never a hit.
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benches"))
    common = pytest.importorskip("_common")
    test = sp.csr_matrix(np.array([[1, 1, 0, 0, 1], [0, 0, 1, 0, 0]], dtype=np.float32))
    ids = np.array([[1, 3, 4], [2, -1, -1]])
    np.testing.assert_allclose(common.recall_of_lists(ids, test, 2), [1 / 3, 1.0])
    np.testing.assert_allclose(common.recall_of_lists(ids, test, 3), [2 / 3, 1.0])
    with pytest.raises(ValueError, match="held-out item"):
        common.recall_of_lists(ids, sp.csr_matrix((2, 5)), 3)
