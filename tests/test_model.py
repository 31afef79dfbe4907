"""CollaborativeMetricLearning: learning, the implicit-style API, persistence, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cml_rs
from cml_rs import datasets, evaluation, training
from cml_rs.model import CollaborativeMetricLearning


def checkerboard(n_users: int = 40, n_items: int = 40) -> sp.csr_matrix:
    """Users like items of their own parity: the right answer is known exactly."""
    users, items = np.meshgrid(np.arange(n_users), np.arange(n_items), indexing="ij")
    liked = (users + items) % 2 == 0
    return sp.csr_matrix(liked.astype(np.float32))


def small_model(**options) -> CollaborativeMetricLearning:
    params = dict(factors=16, epochs=40, batch_size=256, margin=1.0, num_threads=2, random_state=0)
    params.update(options)
    return CollaborativeMetricLearning(**params)


@pytest.fixture(scope="module")
def fitted() -> tuple[CollaborativeMetricLearning, sp.csr_matrix]:
    matrix = checkerboard()
    model = small_model().fit(matrix, show_progress=False)
    return model, matrix


def test_vectors_stay_in_the_ball(fitted):
    model, _ = fitted
    assert np.all(np.linalg.norm(model.user_factors, axis=1) <= 1.0 + 1e-5)
    assert np.all(np.linalg.norm(model.item_factors, axis=1) <= 1.0 + 1e-5)


def test_backends_agree_with_exact():
    data = datasets.synthetic(n_users=600, n_items=400, n_interactions=12000, n_clusters=8, seed=4)
    model = small_model(factors=16, epochs=15).fit(data.user_items, show_progress=False)
    users = np.arange(50)
    rows = data.user_items[users]
    exact, _ = model.recommend(users, rows, N=10)
    for backend in ("lsh", "hnsw"):
        approx, _ = model.recommend(users, rows, N=10, backend=backend)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
        assert overlap > 0.8, (backend, overlap)
    index = cml_rs.retrieval.build_index("exact", model.item_factors)
    same, _ = model.recommend(users, rows, N=10, backend=index)
    np.testing.assert_array_equal(same, exact)


def test_save_load_round_trip_and_damage(fitted, tmp_path):
    model, matrix = fitted
    path = tmp_path / "model.npz"
    model.save(path)
    back = CollaborativeMetricLearning.load(path)
    np.testing.assert_array_equal(back.item_factors, model.item_factors)
    assert back.hyperparameters() == model.hyperparameters()
    np.testing.assert_array_equal(back.recommend(0, matrix[0], N=5)[0], model.recommend(0, matrix[0], N=5)[0])
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        CollaborativeMetricLearning.load(truncated)
    corrupted = tmp_path / "corrupted.npz"
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted|damaged"):
        CollaborativeMetricLearning.load(corrupted)
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        CollaborativeMetricLearning.load(tmp_path / "missing.npz")


def test_unknown_version_and_foreign_files_are_refused(fitted, tmp_path):
    import json

    model, _ = fitted
    path = tmp_path / "model.npz"
    model.save(path)
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["version"] = 99
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    newer = tmp_path / "newer.npz"
    np.savez(newer, **arrays)
    with pytest.raises(ValueError, match="format version 99"):
        CollaborativeMetricLearning.load(newer)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(ValueError, match="no metadata"):
        CollaborativeMetricLearning.load(foreign)


def test_save_never_leaves_a_partial_file(fitted, tmp_path, monkeypatch):
    model, _ = fitted
    path = tmp_path / "model.npz"
    model.save(path)
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_fit_is_deterministic_for_a_seed():
    matrix = checkerboard(20, 20)
    a = small_model(epochs=3).fit(matrix, show_progress=False)
    b = small_model(epochs=3, num_threads=1).fit(matrix, show_progress=False)
    np.testing.assert_allclose(a.item_factors, b.item_factors, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("covariance_rows", ["all", "batch", "sampled"])
def test_refit_with_the_same_seed_repeats_bit_for_bit_on_two_threads(covariance_rows):
    # Batches large enough for torch to split the gradient scatter over threads,
    # with items repeated inside a batch: tensor indexing's backward would add
    # them in a thread-dependent order.
    data = datasets.synthetic(n_users=2000, n_items=3000, n_interactions=40000, n_clusters=20, seed=2)
    runs = [
        small_model(factors=64, epochs=2, batch_size=4096, num_threads=2, covariance_rows=covariance_rows).fit(
            data.user_items, show_progress=False
        )
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].item_factors, runs[1].item_factors)
    np.testing.assert_array_equal(runs[0].user_factors, runs[1].user_factors)


def test_early_stopping_keeps_the_best_and_callback_can_stop():
    data = datasets.synthetic(n_users=300, n_items=200, n_interactions=6000, n_clusters=5, seed=1)
    split = datasets.split_paper(data.user_items, seed=0)
    model = small_model(epochs=30, eval_every=1, patience=2)
    model.fit(split.train, validation=split.validation, show_progress=False)
    recalls = [h["recall@50"] for h in model.history_ if "recall@50" in h]
    assert model.best_epoch_ == int(np.argmax(recalls))
    final = evaluation.ranking_metrics_at_k(model, split.train, split.validation, K=50)
    assert final["recall"] == pytest.approx(max(recalls), abs=1e-9)
    assert final["recall"] > 0.3  # far above chance (~0.25 x 50/200 ... popularity aside)

    seen = []
    model = small_model(epochs=10)
    model.fit(split.train, show_progress=False, callback=lambda epoch, *_: seen.append(epoch) or epoch < 2)
    assert seen == [0, 1, 2]


def test_cml_beats_popularity_on_synthetic_clusters():
    data = datasets.synthetic(n_users=1000, n_items=500, n_interactions=20000, n_clusters=10, seed=2)
    split = datasets.split_paper(data.user_items, seed=0)
    model = small_model(factors=32, epochs=30, eval_every=3, patience=3)
    model.fit(split.train, validation=split.validation, show_progress=False)
    cml = evaluation.ranking_metrics_at_k(model, split.train, split.test, K=20, exclude=split.validation)
    popularity = np.asarray(split.train.sum(axis=0)).ravel()
    # Popularity as a metric model: users at the origin, items ranked by popularity via their norm.
    items = (1.0 - popularity / popularity.max())[:, None].astype(np.float32)
    users = np.zeros((data.n_users, 1), np.float32)
    baseline = evaluation.ranking_metrics_at_k((users, items), split.train, split.test, K=20, exclude=split.validation)
    assert cml["recall"] > 1.5 * baseline["recall"]
    test = evaluation.compare(cml, baseline)
    assert test["wilcoxon_p"] < 0.01 and test["mean_difference"] > 0


def test_negatives_follow_the_density_within_their_range():
    # U = round(0.2 / density), kept within [3, 20], or [3, 40] where the items have 10
    # interactions each on average; explicit zeros are not interactions.
    def density(users: int, items: int, nnz: int) -> sp.csr_matrix:
        flat = np.zeros(users * items, dtype=np.float32)
        flat[:nnz] = 1.0
        return sp.csr_matrix(flat.reshape(users, items))

    assert training.negatives_for(density(100, 100, 200)) == 10  # 2% dense
    assert training.negatives_for(density(100, 100, 150)) == 13  # 1.5%: 0.2 / 0.015 = 13.3
    assert training.negatives_for(density(100, 100, 1000)) == 3  # 10%: at the floor
    assert training.negatives_for(density(100, 1000, 10)) == 20  # 0.01%: at the cap
    # 0.2%, 10 interactions an item: U may reach 40 (0.2 / 0.002 = 100), but not with 9.9.
    assert training.negatives_for(density(5000, 1000, 10_000)) == 40
    assert training.negatives_for(density(5000, 1000, 9_900)) == 20
    assert training.negatives_for(density(1000, 1000, 10_000)) == 20  # 1%: 0.2 / 0.01, below either cap
    assert training.negatives_for(density(2000, 1000, 12_000)) == 33  # 0.6%: 33.3, above the lower cap
    with_zeros = density(100, 100, 400)
    with_zeros.data[:200] = 0.0  # stored, but no interaction: 2% dense
    assert training.negatives_for(with_zeros) == 10


def test_the_fit_records_the_negatives_it_used(tmp_path, monkeypatch):
    matrix = checkerboard(40, 40)  # 50% dense: the rule's floor of 3
    model = small_model(epochs=2).fit(matrix, show_progress=False)
    assert model.n_negatives is None and model.n_negatives_ == 3
    assert small_model(epochs=2, n_negatives=7).fit(matrix, show_progress=False).n_negatives_ == 7
    model.save(tmp_path / "model.npz")
    back = CollaborativeMetricLearning.load(tmp_path / "model.npz")
    assert back.n_negatives is None and back.n_negatives_ == 3
    # Fold-in after loading samples the U the fit used (the matrix it gets is not the data).
    used = []
    sampler = training.WarpSampler

    def recording(*args, **kwargs):
        used.append(kwargs["n_negatives"])
        return sampler(*args, **kwargs)

    monkeypatch.setattr(training, "WarpSampler", recording)
    back.recommend(0, matrix[0], recalculate_user=True)
    monkeypatch.undo()
    assert used == [3]
    # Refit on sparser data: the rule is applied again (1 of 40 items a user: 2.5%, U = 8).
    sparse = sp.csr_matrix((np.ones(40, np.float32), (np.arange(40), np.arange(40))), shape=(40, 40))
    assert back.fit(sparse, show_progress=False).n_negatives_ == 8


@pytest.mark.parametrize(
    "options",
    [
        dict(optimizer="adam", learning_rate=0.01),
        dict(hardest_only=False),
        dict(rank_weighted=False),
        dict(covariance_rows="batch"),
        dict(covariance_rows="all"),
        dict(covariance_rows="sampled", covariance_sample=64),
        dict(lambda_c=0.0),
        dict(margin=0.5),
        dict(n_negatives=20),  # the density rule gives 3 here
        dict(negative_popularity=1.0),
        dict(adaptive_margin=0.5),
        dict(adaptive_margin=0.5, covariance_rows="all"),
        dict(adaptive_margin=0.5, covariance_rows="batch"),
        dict(max_norm=0.5),
    ],
    ids=lambda options: ",".join(options),
)
def test_every_option_changes_the_fit(options):
    # Fits are deterministic for a seed, so an option that was ignored would
    # give bit-identical vectors. Batches of 32 of the 800 pairs touch only some
    # rows, so the batch covariance differs from the one over all rows.
    matrix = checkerboard(40, 40)
    default = small_model(epochs=2, batch_size=32).fit(matrix, show_progress=False)
    changed = small_model(epochs=2, batch_size=32, **options).fit(matrix, show_progress=False)
    assert np.isfinite(changed.item_factors).all()
    assert not np.array_equal(changed.item_factors, default.item_factors), options
    radius = options.get("max_norm", 1.0)
    assert np.linalg.norm(changed.user_factors, axis=1).max() <= radius * (1 + 1e-5)


@pytest.mark.parametrize("covariance_rows", ["all", "sampled"])
def test_adaptive_margins_follow_their_reward_within_bounds(covariance_rows):
    from cml_rs.training import Trainer

    matrix = checkerboard(40, 40)
    means = {}
    for reward in (0.01, 20.0):
        model = small_model(adaptive_margin=reward, covariance_rows=covariance_rows)
        model._build(*matrix.shape, None, None)
        trainer = Trainer(model, matrix, None)
        for epoch in range(3):
            trainer.run_epoch(epoch)
        margins = trainer.margins.detach().numpy().ravel()
        assert margins.min() >= 0.0 and margins.max() <= 4.0 and np.ptp(margins) > 0
        means[reward] = margins.mean()
    # The gradient on m_u is the rank-weighted count of active hinges minus the
    # reward per pair: a small reward narrows the margins, a large one widens them.
    assert means[0.01] < 1.0 < means[20.0]


def test_fit_errors_name_the_problem(fitted):
    _, matrix = fitted
    wide = small_model(epochs=1).fit(checkerboard(30, 40), show_progress=False)
    with pytest.raises(ValueError, match=r"item x user matrix: pass user_items\.T\.tocsr\(\)"):
        wide.fit(checkerboard(30, 40).T.tocsr(), show_progress=False)
    with pytest.raises(ValueError, match="holds no interactions"):
        small_model().fit(sp.csr_matrix((5, 5), dtype=np.float32), show_progress=False)
    with pytest.raises(TypeError, match="scipy.sparse"):
        small_model().fit(np.ones((5, 5)), show_progress=False)
    bad = matrix.copy()
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        small_model().fit(bad, show_progress=False)
    with pytest.raises(ValueError, match="validation has shape"):
        small_model().fit(matrix, validation=matrix[:10], show_progress=False)
    with pytest.warns(UserWarning, match="users have no interactions"):
        rows = sp.vstack([matrix, sp.csr_matrix((1, 40), dtype=np.float32)]).tocsr()
        small_model(epochs=1).fit(rows, show_progress=False)


def test_divergence_stops_before_the_bad_step_and_names_the_remedy(monkeypatch):
    # The hyper-parameter bounds keep a fit finite, so the fault is injected:
    # the loss of the first step of the second epoch turns NaN.
    matrix = checkerboard(20, 20)
    calls = []
    original = training.Trainer.loss

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss, touched = original(self, *args, **kwargs)
        return (loss * float("nan") if len(calls) == 5 else loss), touched

    model = small_model(epochs=5, batch_size=64)  # 200 pairs: 4 steps per epoch
    reference = small_model(epochs=1, batch_size=64).fit(matrix, show_progress=False)
    monkeypatch.setattr(training.Trainer, "loss", poisoned)
    with pytest.raises(
        FloatingPointError, match=r"nan at epoch 1, step 0; the step was not taken.*Lower learning_rate"
    ):
        model.fit(matrix, show_progress=False)
    # The bad step was never applied: the model holds the vectors after epoch 0.
    np.testing.assert_array_equal(model.item_factors, reference.item_factors)


def test_gradient_check_finds_any_non_finite_value_and_only_those():
    dense = torch.nn.Parameter(torch.zeros(3, 4))
    table = torch.nn.Parameter(torch.zeros(5, 2))
    optimizer = torch.optim.Adagrad([dense, table])

    def gradients(dense_grad, sparse_values):
        dense.grad = dense_grad
        table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), sparse_values, (5, 2), check_invariants=True)
        return training._finite_gradients(optimizer)

    finite_sparse = torch.ones(2, 2)
    assert gradients(torch.ones(3, 4), finite_sparse)
    # Finite values whose sum overflows float32 are still finite.
    assert gradients(torch.full((3, 4), 3e38), finite_sparse)
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = torch.full((3, 4), 3e38)
        poisoned[2, 1] = bad
        assert not gradients(poisoned, finite_sparse)
        assert not gradients(torch.ones(3, 4), torch.tensor([[1.0, 1.0], [bad, 1.0]]))


def test_recommend_errors(fitted):
    model, matrix = fitted
    with pytest.raises(IndexError, match="userid 40 is out of range"):
        model.recommend(40, matrix[0], N=5)
    with pytest.raises(IndexError, match="filter_items -1 is out of range"):
        model.recommend(0, matrix[0], filter_items=[-1])
    with pytest.raises(IndexError, match="items 99 is out of range"):
        model.recommend(0, matrix[0], items=[99])
    with pytest.raises(ValueError, match=r"must have 40 columns \(the model's\), got shape \(1, 30\)"):
        model.recommend(0, sp.csr_matrix((1, 30)))
    with pytest.raises(ValueError, match=r"one row per entry of userid \(2\), got 3 rows; pass user_items\[userid\]"):
        model.recommend([0, 1], matrix[:3])
    with pytest.raises(ValueError, match="N must be at least 1"):
        model.recommend(0, matrix[0], N=0)
    with pytest.raises(TypeError, match="integer ids"):
        model.recommend(0.5, matrix[0])
    with pytest.raises(ValueError, match="backend must be"):
        model.recommend(0, matrix[0], backend="annoy")
    with pytest.raises(RuntimeError, match="not fitted"):
        small_model().recommend(0, matrix[0])


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(factors=0), ValueError, "factors must be at least 1"),
        (dict(margin=float("nan")), ValueError, "margin must be finite"),
        (dict(learning_rate=0), ValueError, "learning_rate must be > 0"),
        (dict(optimizer="sgd"), ValueError, "optimizer must be"),
        (dict(covariance_rows="some"), ValueError, "covariance_rows must be"),
        (dict(margin="wide"), TypeError, "margin must be a number"),
        (dict(n_negatives=0), ValueError, "n_negatives must be at least 1"),
        (dict(n_negatives="auto"), TypeError, "n_negatives"),
    ],
)
def test_constructor_validation(options, error, message):
    with pytest.raises(error, match=message):
        CollaborativeMetricLearning(**options)


def test_lazy_exports_resolve_and_unknown_names_fail():
    assert cml_rs.LshIndex.__module__ == "cml_rs.lsh" and "LshIndex" in dir(cml_rs)
    with pytest.raises(AttributeError, match="has no attribute 'not_a_thing'"):
        cml_rs.not_a_thing  # noqa: B018


def test_torch_thread_setting_is_restored():
    before = torch.get_num_threads()
    small_model(epochs=1, num_threads=1).fit(checkerboard(10, 10), show_progress=False)
    assert torch.get_num_threads() == before
