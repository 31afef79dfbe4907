"""cml_rs.tune: successive halving picks on validation, repeats for a seed, refuses bad input."""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import pytest
import scipy.sparse as sp

import cml_rs
from cml_rs import datasets, evaluation, training, tuning

SPACE = {"learning_rate": [1e-5, 0.1], "margin": [0.5, 1.0]}
SMALL = dict(factors=16, batch_size=256, eval_every=1, patience=3, epochs=30)


@pytest.fixture(scope="module")
def split():
    data = datasets.synthetic(n_users=600, n_items=300, n_interactions=12000, n_clusters=8, seed=3)
    return datasets.split_paper(data.user_items, seed=0)


class EpochClock:
    """Stands in for the tuner's clock: time passes only as epochs train, so the tests of
    its budget do not depend on how busy the machine is."""

    def __init__(self, cost: Callable[[int], float]) -> None:
        self.cost, self.now, self.epochs = cost, 0.0, 0

    def perf_counter(self) -> float:
        return self.now

    def charge_epoch(self) -> None:
        self.now += self.cost(self.epochs)
        self.epochs += 1


@pytest.fixture
def epoch_clock(monkeypatch):
    """``epoch_clock(cost)``: from then on the tuner's n-th epoch (over all trials) takes ``cost(n)`` seconds."""

    def install(cost: Callable[[int], float]) -> EpochClock:
        clock = EpochClock(cost)
        run_epoch = training.Trainer.run_epoch

        def charged(self, epoch):
            clock.charge_epoch()
            return run_epoch(self, epoch)

        monkeypatch.setattr(tuning, "time", clock)
        monkeypatch.setattr(training.Trainer, "run_epoch", charged)
        return clock

    return install


@pytest.fixture(scope="module")
def result(split):
    return cml_rs.tune(
        split.train,
        split.validation,
        budget_seconds=3600,
        configurations=9,
        space=SPACE,
        num_threads=2,
        show_progress=False,
        **SMALL,
    )


def test_the_search_keeps_the_configuration_that_learns(result, split):
    # A learning rate of 1e-5 barely moves the random start: every survivor of
    # the first round must have the usable rate, and so must the winner.
    assert result.params["learning_rate"] == 0.1
    assert {"factors": 16, "batch_size": 256}.items() <= result.params.items()
    assert len(result.trials) == 9 and [t["outcome"] for t in result.trials].count("best") == 1
    best = next(t for t in result.trials if t["outcome"] == "best")
    assert all(t["recall"] <= best["recall"] for t in result.trials)
    slow = [t for t in result.trials if t["params"]["learning_rate"] == 1e-5]
    assert slow and all(t["epochs"] == 2 for t in slow)  # dropped after the first rung
    # The model returned holds the best validation state and ranks the test part.
    assert result.model.epochs == SMALL["epochs"]
    valid = evaluation.ranking_metrics_at_k(result.model, split.train, split.validation, K=50)
    assert valid["recall"] == pytest.approx(best["recall"], abs=1e-6)
    test = evaluation.ranking_metrics_at_k(result.model, split.train, split.test, K=50, exclude=split.validation)
    assert test["recall"] > 0.2
    table = result.table().splitlines()
    assert table[0].startswith("| learning_rate | margin | epochs") and len(table) == 2 + 9
    assert "best" in table[2]


def test_the_search_repeats_for_a_seed(result, split):
    again = cml_rs.tune(
        split.train,
        split.validation,
        budget_seconds=3600,
        configurations=9,
        space=SPACE,
        num_threads=1,
        show_progress=False,
        **SMALL,
    )
    assert again.table() == result.table()
    np.testing.assert_array_equal(again.model.item_factors, result.model.item_factors)


def test_the_budget_bounds_the_search(split, epoch_clock):
    # With the number of configurations left to the budget, a tiny budget (less than
    # the first rung's 2 epochs of 1 s) still returns a trained model (the defaults
    # among a handful of trials), and says it could not train it to the end.
    epoch_clock(lambda epoch: 1.0)
    options = {**SMALL, "num_threads": 1}
    with pytest.warns(UserWarning, match="the budget ran out"):
        result = cml_rs.tune(split.train, split.validation, budget_seconds=0.5, show_progress=False, **options)
    assert not result.converged
    assert 1 <= len(result.trials) <= 3 and result.model.item_factors.shape == (300, 16)
    assert np.isfinite(result.model.item_factors).all()


def test_time_left_goes_to_more_brackets(split, epoch_clock):
    # Left to the budget, the search does not stop after one bracket while half of
    # the budget is unspent: later brackets draw fresh configurations of the same
    # number, and the model returned is the best of them all. An epoch costs one
    # second of the tuner's clock, so 3 configurations fit (36 s budget) and brackets
    # of 6 epochs follow one another while one more ends within 18 s: 3 of them.
    epoch_clock(lambda epoch: 1.0)
    options = {**SMALL, "num_threads": 1}
    result = cml_rs.tune(split.train, split.validation, budget_seconds=36, show_progress=False, **options)
    sizes = np.bincount([t["bracket"] for t in result.trials])
    assert sizes.tolist() == [3] * 3, sizes
    assert len({json.dumps(t["params"], sort_keys=True) for t in result.trials}) == len(result.trials)
    best = [t for t in result.trials if t["outcome"] == "best"]
    assert len(best) == 1 and best[0]["recall"] == max(t["recall"] for t in result.trials)
    assert result.seconds <= 36
    # The package defaults are among the trials, U as the data's density gave it.
    defaults = {"margin": 1.5, "learning_rate": 0.1, "lambda_c": 10.0}
    first = [t for t in result.trials if defaults.items() <= t["params"].items()]
    assert [t["params"]["n_negatives"] for t in first] == [training.negatives_for(split.train)]


def _recall_stalled(model, patience: int) -> bool:
    recalls = [h[f"recall@{model.eval_k}"] for h in model.history_ if f"recall@{model.eval_k}" in h]
    return len(recalls) - 1 - int(np.argmax(recalls)) >= patience


def test_the_winner_trains_to_early_stopping(result):
    best = next(t for t in result.trials if t["outcome"] == "best")
    assert len(result.model.history_) == best["epochs"]
    assert best["epochs"] == SMALL["epochs"] or _recall_stalled(result.model, SMALL["patience"])
    assert result.converged


def test_a_budget_that_cuts_the_winner_short_says_so(split, epoch_clock):
    # Epochs of 1 s and a budget of 12 s: the search takes about half, and the
    # winner has a few epochs left, too few for 20 checks of patience or 30 epochs.
    epoch_clock(lambda epoch: 1.0)
    options = {**SMALL, "patience": 20, "num_threads": 1}
    with pytest.warns(UserWarning, match="the budget ran out before the best configuration stopped early"):
        result = cml_rs.tune(split.train, split.validation, budget_seconds=12, show_progress=False, **options)
    best = next(t for t in result.trials if t["outcome"] == "best")
    assert not result.converged and best["epochs"] < options["epochs"]
    assert not _recall_stalled(result.model, options["patience"])


def test_a_slow_first_epoch_does_not_cut_the_winner_short(split, epoch_clock):
    # A GPU's start-up makes the very first epoch slow. Charged to every epoch
    # (3.1 s over the first rung of 2), it would leave the winner 0.9 * 11 / 1.55,
    # about 6 epochs: too few to stop, with 8 checks of patience. Measured over all
    # trials, the winner still trains to early stopping (or the epoch cap) in budget.
    epoch_clock(lambda epoch: 3.0 if epoch == 0 else 0.1)
    options = {**SMALL, "patience": 8, "num_threads": 1}
    result = cml_rs.tune(split.train, split.validation, budget_seconds=15, show_progress=False, **options)
    best = next(t for t in result.trials if t["outcome"] == "best")
    assert best["epochs"] == options["epochs"] or _recall_stalled(result.model, options["patience"]), best
    assert best["epochs"] > 2 + 6
    assert result.seconds <= 15


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(budget_seconds=0), ValueError, "budget_seconds must be"),
        (dict(budget_seconds=float("nan")), ValueError, "budget_seconds"),
        (dict(configurations=0), ValueError, "configurations must be at least 1"),
        (dict(space={"no_such_setting": [1, 2]}), ValueError, r"space names unknown settings \['no_such_setting'\]"),
        (dict(margin=1.0), ValueError, r"\['margin'\] are both searched and fixed"),
        # It used to be replaced by seed (0) without a word: the models were not seeded as asked.
        (dict(random_state=3), ValueError, r"random_state=3 is set by tune's seed; pass seed= instead"),
        (dict(space={"margin": [1.0, -1.0]}), ValueError, "margin must be"),
        (dict(space={"margin": (2.0, 1.0, "log")}), ValueError, r"space\['margin'\] must run from low to high"),
        (dict(space={"margin": {1.0}}), ValueError, r"space\['margin'\] must be a list of choices"),
        (dict(space={"margin": []}), ValueError, "offers no choice"),
    ],
)
def test_bad_arguments_are_named(split, kwargs, error, message):
    options = dict(budget_seconds=10.0, show_progress=False, configurations=1, **SMALL)
    options.update(kwargs)
    with pytest.raises(error, match=message):
        cml_rs.tune(split.train, split.validation, **options)


def test_validation_must_match_and_hold_interactions(split):
    with pytest.raises(ValueError, match="validation has shape"):
        cml_rs.tune(split.train, split.validation[:10], budget_seconds=10)
    with pytest.raises(ValueError, match="validation holds no interactions"):
        cml_rs.tune(split.train, sp.csr_matrix(split.train.shape), budget_seconds=10)
