"""The benchmark prototypes of CML's successors (benches/sfcml.py, benches/dpcml.py): their
losses and scores against the definitions written out by hand, so the panel's figures for
them rest on code that is checked."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import REPO_ROOT

import cml_rs
from cml_rs import baselines, datasets, evaluation, nn

sys.path.insert(0, str(REPO_ROOT / "benches"))
dpcml = pytest.importorskip("dpcml")
sfcml = pytest.importorskip("sfcml")


def test_the_sampling_free_loss_is_the_mean_over_every_positive_negative_pair():
    # The factored form in SamplingFreeCML.loss (negatives' sums as every item's sums
    # less the positives', through sum_j v_j and V^T V) against the definition: mean
    # over users of mean_{i in P, j in N} (m - (s_i - s_j))^2.
    generator = torch.Generator().manual_seed(0)
    model = sfcml.SamplingFreeCML(margin=0.7, learning_rate=0.1, seed=0, threads=1)
    model.users = torch.nn.functional.normalize(torch.randn(5, 5, generator=generator), dim=1)
    model.items = torch.nn.functional.normalize(torch.randn(6, 5, generator=generator), dim=1)
    targets = np.array(
        [[1, 0, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]
    )
    users = torch.tensor([4, 0, 1, 2, 3])  # batch rows in another order than the users
    targets = targets[[4, 0, 1, 2, 3]]
    scores = 2.0 * model.users[users] @ model.items.T
    by_hand = []
    for row in range(5):  # a user with no negative or no positive does not count
        positives, negatives = np.flatnonzero(targets[row] > 0), np.flatnonzero(targets[row] == 0)
        if len(positives) and len(negatives):
            pairs = [(0.7 - (scores[row, i] - scores[row, j])) ** 2 for i in positives for j in negatives]
            by_hand.append(torch.stack(pairs).mean())
    loss = model.loss(users, sp.csr_matrix(targets))
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)


def test_the_sampling_free_loss_has_the_gradients_of_its_definition():
    # Training follows the factored loss's gradients: they must be the pair definition's,
    # for the batch's users (a sparse gradient) and for every item.
    generator = torch.Generator().manual_seed(1)
    model = sfcml.SamplingFreeCML(margin=1.3, learning_rate=0.1, seed=0, threads=1)
    users_start = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator), dim=1)
    items_start = torch.nn.functional.normalize(torch.randn(7, 4, generator=generator), dim=1)
    targets = (torch.rand(3, 7, generator=generator) < 0.4).numpy().astype(np.float32)
    targets[:, 0], targets[:, 1] = 1, 0  # every row has a positive and a negative
    batch = torch.tensor([5, 1, 3])
    gradients = []
    for factored in (True, False):
        model.users = users_start.clone().requires_grad_()
        model.items = items_start.clone().requires_grad_()
        if factored:
            loss = model.loss(batch, sp.csr_matrix(targets))
        else:
            scores = 2.0 * model.users[batch] @ model.items.T
            per_user = []
            for r in range(3):
                positive = scores[r, np.flatnonzero(targets[r])]
                negative = scores[r, np.flatnonzero(targets[r] == 0)]
                per_user.append(((1.3 - (positive[:, None] - negative[None, :])) ** 2).mean())
            loss = torch.stack(per_user).mean()
        loss.backward()
        user_grad = model.users.grad.to_dense() if model.users.grad.is_sparse else model.users.grad
        gradients.append((user_grad, model.items.grad))
    torch.testing.assert_close(gradients[0][0], gradients[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gradients[0][1], gradients[1][1], rtol=1e-4, atol=1e-6)
    assert gradients[0][0][[0, 2, 4]].abs().max() == 0  # users outside the batch do not move


def test_the_sampling_free_model_learns_and_keeps_unit_vectors():
    data = datasets.synthetic(n_users=300, n_items=120, n_interactions=6000, n_clusters=6, seed=1)
    split = datasets.split_paper(data.user_items, seed=0)
    model = sfcml.SamplingFreeCML(
        margin=2.0, learning_rate=0.5, seed=0, threads=1, validation=split.validation, dim=16, max_epochs=20
    ).fit(split.train)
    norms = torch.linalg.vector_norm(torch.cat([model.users, model.items]), dim=1)
    np.testing.assert_allclose(norms.detach().numpy(), 1.0, rtol=1e-5)

    def test_recall(recommender) -> float:
        return evaluation.ranking_metrics_at_k(recommender, split.train, split.test, K=20, exclude=split.validation)[
            "recall"
        ]

    # Popularity scores about 0.41 here; the clusters let a learned model do far better.
    popularity = baselines.Popularity().fit(split.train)
    assert 1 <= model.epochs_ <= 20 and test_recall(model) > 1.4 * test_recall(popularity)


def test_nearest_vector_distances_take_the_closest_of_a_users_vectors():
    model = dpcml.NearestVectorCML(n_users=3, n_items=5, vectors=2, dim=4, seed=0)
    users, items = torch.tensor([0, 1, 2, 2]), torch.tensor([4, 0, 3, 1])
    u, v = model.users.detach(), model.items.detach()
    by_hand = torch.stack([min(((u[a, c] - v[b]) ** 2).sum() for c in range(2)) for a, b in zip(users, items)])
    torch.testing.assert_close(model.nearest_distances(users, items), by_hand)
    negatives = torch.tensor([[0, 1, 2], [2, 3, 4], [4, 4, 0], [1, 0, 3]])
    table = model.negative_distances(users, negatives)
    for row, (a, picks) in enumerate(zip(users, negatives)):
        want = torch.stack([min(((u[a, c] - v[b]) ** 2).sum() for c in range(2)) for b in picks])
        torch.testing.assert_close(table[row], want, rtol=1e-5, atol=1e-6)
    scores = model.scores(np.arange(3), sp.csr_matrix((3, 5)))
    for a in range(3):
        want = [-min(((u[a, c] - v[b]) ** 2).sum().item() for c in range(2)) for b in range(5)]
        np.testing.assert_allclose(scores[a], want, rtol=1e-5, atol=1e-6)


def test_the_diversity_penalty_counts_pairs_outside_the_band():
    model = dpcml.NearestVectorCML(n_users=1, n_items=2, vectors=3, dim=2, seed=0)
    with torch.no_grad():  # squared distances: 0.01 (too close), 0.16 and 0.17 (inside)
        model.users.copy_(torch.tensor([[[0.0, 0.0], [0.1, 0.0], [0.0, 0.4]]]))
    low, high = 0.05, 0.2
    # Pairs (0,1): 0.01 < low by 0.04; (0,2): 0.16 inside; (1,2): 0.17 inside. Each
    # unordered pair appears twice among the 6 ordered ones.
    penalty = model.diversity_penalty(torch.tensor([0]), low, high)
    assert penalty.item() == pytest.approx(2 * 0.04 / 6, rel=1e-5)
    single = dpcml.NearestVectorCML(n_users=1, n_items=2, vectors=1, dim=2, seed=0)
    assert single.diversity_penalty(torch.tensor([0]), low, high).item() == 0.0


def test_one_vector_per_user_keeps_cmls_distances():
    # The control of the DPCML runs: with C = 1 the nearest-vector distance is CML's.
    model = dpcml.NearestVectorCML(n_users=4, n_items=6, vectors=1, dim=3, seed=0)
    embedding = nn.CMLEmbedding.from_vectors(model.users.detach()[:, 0], model.items.detach())
    users, items = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 4, 0, 1])
    negatives = torch.tensor([[0, 1], [2, 3], [4, 5], [5, 0]])
    positive, negative = embedding.distances(users, items, negatives)
    torch.testing.assert_close(model.nearest_distances(users, items), positive)
    torch.testing.assert_close(model.negative_distances(users, negatives), negative, rtol=1e-5, atol=1e-6)


def test_the_gowalla_refit_trains_the_given_epochs_on_train_plus_validation_and_keeps_per_user_metrics():
    # benches/gpu_check.py's refit-only path (--gowalla-refit-epochs), on a synthetic split:
    # the figure it reports is a model fit on train + validation for exactly the epochs an
    # earlier validation run chose, scored on test with train + validation excluded.
    gpu_check = pytest.importorskip("gpu_check")
    data = datasets.synthetic(n_users=120, n_items=80, n_interactions=2400, n_clusters=4, seed=2)
    split = datasets.split_paper(data.user_items, seed=0)
    full_train = (split.train + split.validation).tocsr()
    settings = {"factors": 8, "random_state": 0, "num_threads": 1, "n_negatives": 5}
    run = gpu_check.gowalla_cml(split, full_train, "cpu", settings=settings, refit_epochs=3)
    assert run["refit_epochs"] == 3 and "test_trained_on_train_only" not in run
    refit = cml_rs.CML(**{**settings, "device": "cpu", "batch_size": 8192, "eval_k": 20, "epochs": 3})
    refit.fit(full_train, show_progress=False)
    expected = evaluation.ranking_metrics_at_k(refit, full_train, split.test, K=20)
    assert run["test"]["recall@20"] == pytest.approx(expected["recall"])
    np.testing.assert_allclose(run["per_user"]["recall@20"], expected.per_user["recall"])
    with pytest.raises(ValueError, match="settings"):
        gpu_check.gowalla_cml(split, full_train, "cpu", refit_epochs=3)


def test_the_gowalla_baseline_refit_fits_on_train_plus_validation():
    # --gowalla-baseline: a panel baseline refit on train + validation, scored on test with
    # both excluded, per-user values kept for the paired test against CML's refit.
    gpu_check = pytest.importorskip("gpu_check")
    data = datasets.synthetic(n_users=120, n_items=80, n_interactions=2400, n_clusters=4, seed=3)
    split = datasets.split_paper(data.user_items, seed=0)
    full_train = (split.train + split.validation).tocsr()
    params = {"alpha": 1.0, "beta": 0.3, "top_k": 20, "normalize": True}
    run = gpu_check.gowalla_baseline_refit(split, full_train, "cpu", "rp3beta", params)
    expected = evaluation.ranking_metrics_at_k(
        baselines.RP3beta(**params).fit(full_train), full_train, split.test, K=50
    )
    on_train_only = evaluation.ranking_metrics_at_k(
        baselines.RP3beta(**params).fit(split.train), full_train, split.test, K=50
    )
    assert run["model"] == "rp3beta" and run["test"]["recall@50"] == pytest.approx(expected["recall"])
    assert run["test"]["recall@50"] != pytest.approx(on_train_only["recall"])
    np.testing.assert_allclose(run["per_user"]["recall@50"], expected.per_user["recall"])


def test_the_gowalla_report_pairs_each_refit_with_cmls_users(tmp_path):
    gpu_check = pytest.importorskip("gpu_check")
    users = np.arange(40)
    cml = np.linspace(0.0, 1.0, 40)
    for name, values in (("cml", cml), ("ease", cml * 0.5)):
        gpu_check.save_per_user(
            {"model": name, "params": {"regularization": 1.0}, "per_user": {"user": users, "recall@20": values}},
            tmp_path,
        )
        (tmp_path / f"gowalla_{name}.json").write_text('{"params": {"regularization": 1.0}}')
    table = gpu_check.gowalla_report(tmp_path, metrics=("recall@20",))
    ease_row = next(line for line in table.splitlines() if line.startswith("| ease"))
    assert "0.2500 (-50.0%, " in ease_row and table.index("| cml") < table.index("| ease")
    np.savez(tmp_path / "gowalla_ease_per_user.npz", user=users[::-1], **{"recall@20": cml})
    with pytest.raises(SystemExit, match="other test users"):
        gpu_check.gowalla_report(tmp_path, metrics=("recall@20",))


def test_the_gowalla_report_needs_cmls_run(tmp_path):
    gpu_check = pytest.importorskip("gpu_check")
    run = {"model": "ease", "params": {}, "per_user": {"user": np.arange(3), "recall@20": np.ones(3)}}
    gpu_check.save_per_user(run, tmp_path)
    (tmp_path / "gowalla_ease.json").write_text('{"params": {}}')
    with pytest.raises(SystemExit, match="no gowalla_cml_per_user.npz"):
        gpu_check.gowalla_report(tmp_path, metrics=("recall@20",))


@pytest.mark.parametrize("family", ["lightfm", "sfcml", "cml"])
def test_the_gowalla_baseline_refit_refuses_families_that_tune_inside_their_fit(family, tmp_path, monkeypatch, capsys):
    # LightFM and SFCML choose their epochs on validation inside fit, which a refit on
    # train + validation cannot do, and CML has its own flag (--gowalla-cml-settings);
    # the command line says so before loading any data.
    gpu_check = pytest.importorskip("gpu_check")
    argv = ["gpu_check.py", "--data", str(tmp_path), "--out", str(tmp_path), "--gowalla-baseline", family, "{}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        gpu_check.main()
    assert f"{family!r} is not one of" in capsys.readouterr().err
