"""Hyper-parameter search for CML under a time budget: seeded successive halving.

    result = cml_rs.tune(split.train, split.validation, budget_seconds=600)
    result.model            # the best model found, early-stopped on validation
    print(result.table())   # every trial: settings, epochs, validation recall

The settings that matter most on our panel (benches/RESULTS.md) are searched:
the margin, the learning rate, the negatives per pair and the covariance
weight. A seeded set of configurations (the package defaults among them)
trains a few epochs each; the best third, by validation recall@``eval_k``,
trains three times as long, and so on, until one remains. While half the
budget is not spent, further brackets of fresh configurations follow; the
best of all then trains to early stopping with what is left of the budget.
Each configuration keeps its optimiser state across rounds, so no work is
redone.

Why not a tuning library such as optuna: this search has four dimensions and
one fidelity (epochs), successive halving is a few dozen lines that repeat
exactly for a seed, and the package gains no dependency. The budget is wall
time on the caller's machine: the number of configurations is chosen from
the measured cost of an epoch so that the rounds fit in it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._checks import as_csr, check_float, check_int
from ._params import check_hyperparameters, defaults
from .training import Trainer, resolve_negatives, restore, torch_threads

__all__ = ["SEARCH_SPACE", "TuneResult", "tune"]

#: The searched settings: (low, high, scale) ranges, or lists of choices. U's
#: choices were widened each time the best sat on an edge (benches/RESULTS.md):
#: 10 and 40 of [10, 20, 40] on ml-100k and Gowalla, then 5 of [5, ..., 80] on ml-100k.
SEARCH_SPACE: dict[str, Any] = {
    "margin": (0.5, 3.0, "log"),
    "learning_rate": (0.03, 0.3, "log"),
    "n_negatives": [2, 3, 5, 10, 20, 40, 80],
    "lambda_c": (0.3, 30.0, "log"),
}
#: Each round keeps this share of the configurations (and trains it ETA times longer).
ETA = 3
#: The winner's last training runs this many validation checks at a time, so the
#: budget is checked against the measured cost of an epoch between them.
CHECKS_PER_CHUNK = 5


@dataclass
class TuneResult:
    """What :func:`tune` found: the model, its settings, and every trial."""

    model: Any
    params: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    searched: list[str] = field(default_factory=lambda: list(SEARCH_SPACE))
    #: Whether the model trained to early stopping (or its epoch cap); False when the
    #: budget ended its training first, and a fit of ``params`` may then score higher.
    converged: bool = True

    def table(self) -> str:
        """The trials as a markdown table, best validation recall first."""
        names = self.searched
        lines = ["| " + " | ".join([*names, "epochs", "validation recall", "kept"]) + " |"]
        lines.append("|" + "---|" * (len(names) + 3))
        for trial in sorted(self.trials, key=lambda t: -t["recall"]):
            values = [_format(trial["params"][n]) for n in names]
            lines.append(
                "| " + " | ".join([*values, str(trial["epochs"]), f"{trial['recall']:.4f}", trial["outcome"]]) + " |"
            )
        return "\n".join(lines)


def _format(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _check_space(space: dict[str, Any]) -> None:
    """Every choice and range end a valid value of its setting, or a ValueError naming it."""
    unknown = sorted(set(space) - set(defaults()))
    if unknown:
        raise ValueError(f"space names unknown settings {unknown}")
    for name, spec in space.items():
        if isinstance(spec, list):
            values = spec
        elif isinstance(spec, tuple) and len(spec) == 3 and spec[2] in ("log", "linear"):
            values = [spec[0], spec[1]]
            if not spec[0] < spec[1] or (spec[2] == "log" and spec[0] <= 0):
                raise ValueError(f"space[{name!r}] must run from low to high (low > 0 on a log scale), got {spec}")
        else:
            raise ValueError(
                f"space[{name!r}] must be a list of choices or (low, high, 'log' | 'linear'), got {spec!r}"
            )
        if not values:
            raise ValueError(f"space[{name!r}] offers no choice")
        for value in values:
            check_hyperparameters({name: value})


def _draw(space: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    params = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            params[name] = spec[int(rng.integers(len(spec)))]
        else:
            low, high, scale = spec
            value = math.exp(rng.uniform(math.log(low), math.log(high))) if scale == "log" else rng.uniform(low, high)
            params[name] = float(value)
    return params


class _Trial:
    """One configuration: a model and its trainer, trained a few epochs at a time."""

    def __init__(
        self,
        params: dict[str, Any],
        base: dict[str, Any],
        train: sp.csr_matrix,
        validation: sp.csr_matrix,
        bracket: int = 0,
    ):
        from .model import CollaborativeMetricLearning

        self.bracket = bracket
        self.model = CollaborativeMetricLearning(**{**base, **params})
        self.model._build(*train.shape, None, None)
        # The defaults' U (None) is recorded as the number the data's density gave.
        resolve_negatives(self.model, train)
        self.params = {**params, "n_negatives": self.model.n_negatives_} if "n_negatives" in params else params
        self.trainer = Trainer(self.model, train, validation)
        self.epochs = 0
        self.seconds = 0.0  # wall time spent training (evaluations included)

    @property
    def recall(self) -> float:
        """The best validation recall this configuration has reached so far."""
        return self.trainer.best_recall

    @property
    def stopped(self) -> bool:
        """Whether validation recall has stalled for ``patience`` checks (early stopping)."""
        return self.trainer.stale >= self.model.patience

    def train(self, epochs: int) -> None:
        """Trains up to ``epochs`` more epochs (fewer if it stops early), keeping the latest weights."""
        start = time.perf_counter()
        self.model.epochs = self.epochs + epochs
        with torch_threads(self.model.num_threads):
            self.trainer.run(show_progress=False, callback=None, first_epoch=self.epochs, restore_best=False)
        self.epochs = len(self.model.history_)
        self.seconds += time.perf_counter() - start

    def keep_best(self) -> None:
        """Puts back the weights of the best validation recall."""
        if self.trainer.best_state is not None:
            restore(self.model, self.trainer.best_state)

    def record(self, outcome: str) -> dict[str, Any]:
        return {
            "params": self.params,
            "epochs": self.epochs,
            "recall": self.recall,
            "outcome": outcome,
            "bracket": self.bracket,
        }


def _halve(trials: list[_Trial], rung: int, start: float, budget: float, bar: Any, history: list) -> _Trial:
    """One bracket of successive halving: every trial trains to the rung, the best third
    goes on to a rung three times longer, until one is left or half the budget is
    spent; the dropped trials are recorded in ``history``. Returns the bracket's best."""
    alive = trials
    while len(alive) > 1 and time.perf_counter() - start < 0.5 * budget:
        for trial in alive:
            if trial.epochs < rung:
                trial.train(rung - trial.epochs)
            bar.update(1)
            bar.set_postfix(best=f"{max(t.recall for t in alive):.4f}")
        alive.sort(key=lambda t: -t.recall)  # stable: ties keep the earlier (defaults first)
        keep = max(1, len(alive) // ETA)
        history.extend(trial.record("dropped") for trial in alive[keep:])
        alive = alive[:keep]
        rung *= ETA
    alive.sort(key=lambda t: -t.recall)
    history.extend(trial.record("dropped") for trial in alive[1:])
    return alive[0]


def tune(
    user_items: Any,
    validation: Any,
    budget_seconds: float = 600.0,
    seed: int = 0,
    num_threads: int = 0,
    configurations: int | None = None,
    space: dict[str, Any] | None = None,
    show_progress: bool = True,
    **fixed: Any,
) -> TuneResult:
    """Searches the settings that matter (``SEARCH_SPACE``) on ``validation``, within
    ``budget_seconds`` of wall time, and returns the best model (trained to early stopping).

    Parameters
    ----------
    user_items, validation : scipy.sparse matrices (n_users, n_items)
        Training interactions, and the held-out ones that judge the trials.
    budget_seconds : float
        Wall time the whole search may take (the final training included).
    seed : int
        Seed of the configurations drawn (and of every model).
    configurations : int, optional
        How many configurations each bracket starts with (the package defaults
        are the first of the first). By default as many as the budget affords
        (3 to 81), measured from the first epochs, and brackets follow one
        another while half the budget is left; fixed, there is one bracket
        and, with a budget that is not used up, the search repeats exactly for
        a seed.
    space : dict, optional
        Replaces ``SEARCH_SPACE``: name -> (low, high, "log" or "linear") or a list of choices.
    fixed : keyword arguments
        Other CML settings, the same for every trial (e.g. ``factors=64``).

    Returns
    -------
    TuneResult
        ``model`` (fitted, best validation recall), ``params``, ``trials``, ``table()``,
        and ``converged``: False, with a warning, when the budget ended the best
        model's training before early stopping did.
    """
    from tqdm.auto import tqdm

    train = as_csr(user_items, "user_items")
    valid = as_csr(validation, "validation")
    if valid.shape != train.shape:
        raise ValueError(f"validation has shape {valid.shape} but user_items has {train.shape}")
    if valid.nnz == 0:
        raise ValueError("validation holds no interactions; the trials cannot be compared")
    budget = check_float(budget_seconds, "budget_seconds", minimum=0.0, strict=True)
    seed = check_int(seed, "seed", minimum=0)
    if configurations is not None:
        configurations = check_int(configurations, "configurations", minimum=1, maximum=729)
    space = dict(SEARCH_SPACE if space is None else space)
    _check_space(space)
    if "random_state" in fixed:
        # Every trial's model is seeded by ``seed``; a second seed would be overridden.
        raise ValueError(f"random_state={fixed['random_state']!r} is set by tune's seed; pass seed= instead")
    clash = sorted(set(space) & set(fixed))
    if clash:
        raise ValueError(f"{clash} are both searched and fixed; drop them from space or from the fixed settings")
    base = {**fixed, "num_threads": num_threads, "random_state": seed}
    final_epochs = int(base.get("epochs", defaults()["epochs"]))
    start = time.perf_counter()

    # The package defaults are the first configuration; the cost of its first
    # rung sets how many configurations the rounds can afford.
    rng = np.random.default_rng(seed)
    first = _Trial({n: defaults()[n] for n in space}, base, train, valid)
    rung = 2
    first.train(rung)
    epoch_seconds = max((time.perf_counter() - start) / rung, 1e-3)
    repeat = configurations is None  # brackets follow one another until the budget's half is spent
    if configurations is None:
        # Successive halving with n configurations and rungs of r, 3r, 9r ... epochs
        # costs about n * r * (number of rungs) epochs; half the budget is kept
        # for the winner's training to convergence.
        affordable = 0.5 * budget / epoch_seconds
        configurations = 81
        while configurations > 3 and configurations * rung * (1 + math.log(configurations, ETA)) > affordable:
            configurations //= ETA
    trials = [first] + [_Trial(_draw(space, rng), base, train, valid) for _ in range(configurations - 1)]
    everyone = list(trials)
    history: list[dict[str, Any]] = []
    bar = tqdm(total=None, disable=not show_progress, unit="trial", desc=f"tune ({configurations} configurations)")
    best: _Trial | None = None
    bracket_start = start
    try:
        while True:
            winner = _halve(trials, rung, start, budget, bar, history)
            if best is None or winner.recall > best.recall:
                best, winner = winner, best
            if winner is not None:
                history.append(winner.record("dropped"))
            # The estimate above errs on the safe side (the first epochs pay for start-up),
            # so time is often left: another bracket of fresh configurations, when one
            # as long as the last still fits in the half of the budget kept for the search.
            now = time.perf_counter()
            if not repeat or (now - start) + (now - bracket_start) > 0.5 * budget:
                break
            bracket_start = now
            bracket = trials[0].bracket + 1
            trials = [_Trial(_draw(space, rng), base, train, valid, bracket) for _ in range(configurations)]
            everyone += trials
    finally:
        bar.close()
    assert best is not None
    # The winner trains on from its state to early stopping, within what is left
    # of the budget and the epochs a fit would be allowed. The cost of an epoch
    # is measured over every trial so far (start-up, such as a GPU's, is spread
    # over all their epochs rather than charged to the first rung) and again
    # after each chunk of a few validation checks.
    check = best.model.eval_every
    while best.epochs < final_epochs and not best.stopped:
        epoch_seconds = sum(t.seconds for t in everyone) / max(1, sum(t.epochs for t in everyone))
        affordable = int(0.9 * (budget - (time.perf_counter() - start)) / max(epoch_seconds, 1e-6))
        chunk = min(final_epochs - best.epochs, check * min(CHECKS_PER_CHUNK, affordable // check))
        if chunk < 1:
            break
        best.train(chunk)
    converged = best.stopped or best.epochs >= final_epochs
    best.keep_best()
    best.model.epochs = final_epochs
    history.append(best.record("best"))
    params = {**base, **best.params}
    seconds = time.perf_counter() - start
    if not converged:
        warnings.warn(
            f"tune: the budget ran out before the best configuration stopped early (it trained {best.epochs} "
            f"of at most {final_epochs} epochs); raise budget_seconds, or fit CML(**result.params) with "
            "validation to train it to early stopping",
            stacklevel=2,
        )
    return TuneResult(
        model=best.model, params=params, trials=history, seconds=seconds, searched=list(space), converged=converged
    )
