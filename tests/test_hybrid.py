"""Hybrid CML: item and user feature networks, cold start, and their bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import tiny_data
import torch

import cml_rs
from cml_rs import datasets, features, nn

N_CLUSTERS = 6


@pytest.fixture(scope="module")
def clusters():
    """Synthetic data with planted clusters; each item's only feature is its cluster."""
    data = datasets.synthetic(n_users=600, n_items=300, n_interactions=9000, n_clusters=N_CLUSTERS, seed=3)
    cluster = np.array([int(label.split()[1]) for label in data.item_labels])
    onehot = sp.csr_matrix(np.eye(N_CLUSTERS, dtype=np.float32)[cluster])
    noise = sp.random(300, 40, density=0.05, random_state=1, format="csr", dtype=np.float32)
    return data, cluster, {"cluster": onehot, "noise": noise}


@pytest.fixture(scope="module")
def hybrid(clusters):
    data, _, blocks = clusters
    model = cml_rs.CML(factors=16, epochs=20, batch_size=256, num_threads=2, covariance_rows="batch", lambda_f=1.0)
    return model.fit(data.user_items, item_features=blocks, show_progress=False)


def test_feature_blocks_are_normalised_each_on_its_own():
    counts = sp.csr_matrix(np.array([[0, 3, 4], [1, 0, 0]], np.float32))
    flags = sp.csr_matrix(np.array([[1, 1], [0, 0]], np.float32))
    combined, layout = features.prepare({"words": counts, "tags": flags}, 2, "x")
    assert layout.blocks == [("words", 3), ("tags", 2)] and combined.shape == (2, 5)
    dense = combined.toarray()
    np.testing.assert_allclose(np.linalg.norm(dense[0, :3]), 1.0, rtol=1e-6)  # each block unit length
    np.testing.assert_allclose(np.linalg.norm(dense[0, 3:]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(dense[0, 1] / dense[0, 2], np.log1p(3) / np.log1p(4), rtol=1e-6)  # counts tempered
    assert np.all(dense[1, 3:] == 0)  # a row without the block stays zero


def test_the_network_runs_on_the_batch_items_only(clusters, monkeypatch):
    data, _, blocks = clusters
    seen_rows = []
    original = nn.FeatureProjector.forward

    def counting(self, x):
        seen_rows.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(nn.FeatureProjector, "forward", counting)
    cml_rs.CML(factors=8, epochs=1, batch_size=64, num_threads=1).fit(
        data.user_items, item_features=blocks, show_progress=False
    )
    steps = seen_rows[1:]  # the first call initialises every item vector at f(x)
    assert seen_rows[0] == 300 and max(steps) <= 2 * 64 < 300


def test_a_new_item_lands_among_its_cluster(hybrid, clusters):
    _, cluster, _ = clusters
    new = {"cluster": sp.csr_matrix(np.eye(N_CLUSTERS, dtype=np.float32)), "noise": sp.csr_matrix((N_CLUSTERS, 40))}
    vectors = hybrid.item_vectors_from_features(new)
    assert vectors.shape == (N_CLUSTERS, 16) and np.all(np.linalg.norm(vectors, axis=1) <= 1 + 1e-5)
    ids, _ = cml_rs.topk_l2(vectors, hybrid.item_factors, 10)
    share = np.mean([np.mean(cluster[row] == c) for c, row in enumerate(ids)])
    assert share > 0.8, share
    before = hybrid.n_items
    added = hybrid.add_items(new)
    assert added.tolist() == list(range(before, before + N_CLUSTERS)) and hybrid.n_items == before + N_CLUSTERS
    near, _ = hybrid.similar_items(int(added[2]), N=6)
    assert near[0] == added[2] and np.mean(cluster[near[1:][near[1:] < before]] == 2) > 0.7
    # New items compete with trained ones in recommend (items= restricts to them).
    user = int(np.flatnonzero(np.isin(np.arange(600), np.arange(600)))[0])
    ids, _ = hybrid.recommend(user, sp.csr_matrix((1, hybrid.n_items), dtype=np.float32), N=3, items=added)
    assert set(ids.tolist()) <= set(added.tolist())


def test_user_features_train_a_second_network(tmp_path):
    data = datasets.load_movielens_100k(tiny_data.movielens_100k(tmp_path))
    assert set(data.user_features) == {"age", "gender", "occupation"}
    model = cml_rs.CML(factors=4, epochs=3, num_threads=1, lambda_g=2.0)
    model.fit(data.user_items, user_features=data.user_features, item_features=data.item_features, show_progress=False)
    assert model.user_network_ is not None and model.item_network_ is not None
    newcomer = {name: block[:1] for name, block in data.user_features.items()}
    assert model.user_vectors_from_features(newcomer).shape == (1, 4)
    assert model.add_users(newcomer).tolist() == [3]
    path = tmp_path / "model.npz"
    model.save(path)
    back = cml_rs.CML.load(path)
    np.testing.assert_allclose(
        back.user_vectors_from_features(newcomer), model.user_vectors_from_features(newcomer), rtol=1e-6
    )
    assert back.user_feature_layout_ == model.user_feature_layout_


def test_fold_in_can_start_from_the_features(hybrid, clusters):
    data, _, blocks = clusters
    first = {k: v[:1] for k, v in blocks.items()}
    item_users = data.user_items.T.tocsr()[:1]
    copy = cml_rs.CML.load(_saved(hybrid))
    copy.fold_in_epochs = 0  # no refinement: the row is exactly where it starts
    copy.partial_fit_items([0], item_users, item_features=first)
    np.testing.assert_allclose(copy.item_factors[0], hybrid.item_vectors_from_features(first)[0], rtol=1e-6)
    copy.partial_fit_items([0], item_users)  # without features: the centroid of its users
    centroid = hybrid.user_factors[item_users.indices].mean(axis=0)
    np.testing.assert_allclose(copy.item_factors[0], centroid / max(1.0, np.linalg.norm(centroid)), rtol=1e-5)


def _saved(model):
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    return buffer


def test_tying_rare_items_to_their_features(clusters):
    data, _, blocks = clusters
    options = dict(factors=8, epochs=2, batch_size=256, num_threads=1, covariance_rows="batch")
    tied = cml_rs.CML(**options, feature_tie_below=10**9).fit(
        data.user_items, item_features=blocks, show_progress=False
    )
    np.testing.assert_allclose(tied.item_factors, tied.item_vectors_from_features(blocks), rtol=1e-5, atol=1e-6)
    free = cml_rs.CML(**options).fit(data.user_items, item_features=blocks, show_progress=False)
    assert not np.allclose(free.item_factors, free.item_vectors_from_features(blocks))


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda m, b: m.item_vectors_from_features(b["cluster"]), ValueError, "blocks \\['features'\\] but the model"),
        (lambda m, b: m.item_vectors_from_features({**b, "extra": b["noise"]}), ValueError, "trained with"),
        (
            lambda m, b: m.item_vectors_from_features({**b, "noise": b["noise"][:, :5]}),
            ValueError,
            "has 5 columns but the model was trained with 40",
        ),
        (lambda m, b: m.user_vectors_from_features(b["cluster"]), ValueError, "fitted without user_features"),
        (lambda m, b: m.item_vectors_from_features([1, 2]), TypeError, "scipy.sparse matrix or a dict"),
    ],
)
def test_cold_start_bad_input(hybrid, clusters, make, error, message):
    with pytest.raises(error, match=message):
        make(hybrid, clusters[2])


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (
            lambda b: {"cluster": b["cluster"].T.tocsr()},
            "one row per entry \\(300\\), got shape \\(6, 300\\); pass its transpose",
        ),
        (lambda b: {"cluster": b["cluster"].multiply(-1).tocsr()}, "must hold finite, non-negative values"),
        (lambda b: {}, "empty dict"),
    ],
)
def test_fit_feature_bad_input(clusters, blocks, message):
    data, _, raw = clusters
    with pytest.raises(ValueError, match=message):
        cml_rs.CML(epochs=1).fit(data.user_items, item_features=blocks(raw), show_progress=False)


def test_the_network_keeps_its_output_in_the_ball():
    network = nn.FeatureProjector(5, 3, hidden=4, max_norm=0.5)
    with torch.no_grad():
        out = network(torch.rand(7, 5, generator=torch.Generator().manual_seed(0)) * 100)
    assert float(out.norm(dim=1).max()) <= 0.5 + 1e-6
