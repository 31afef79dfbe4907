"""The hyper-parameters of :class:`cml_rs.CML`, declared once.

The constructor checks its arguments against this table, ``save`` / ``load``
write and read them by it, and the command line derives its flags from it,
so ``cml-rs train --help`` lists the defaults without building a model (or
importing torch). Bounds are what still makes sense, not what works best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._checks import check_float, check_int

__all__ = ["HYPERPARAMETERS", "Hyperparameter", "check_hyperparameters", "defaults"]

#: Most threads a fit may ask for (the native core refuses more).
MAX_THREADS = 1024


@dataclass(frozen=True)
class Hyperparameter:
    """One constructor argument: its default, type, bounds and help text."""

    name: str
    default: Any
    help: str
    kind: type = float
    minimum: float | None = None
    maximum: float | None = None
    strict: bool = False  # the minimum itself is excluded
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # the command-line option, None for none
    optional: bool = False  # None is allowed: the value is then chosen from the data

    def check(self, value: Any) -> Any:
        """``value`` converted to this parameter's type, or a TypeError / ValueError naming it."""
        if value is None and self.optional:
            return None
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{self.name} must be True or False, got {type(value).__name__}")
            return value
        if self.kind is int:
            maximum = None if self.maximum is None else int(self.maximum)
            return check_int(value, self.name, int(self.minimum or 0), maximum)
        return check_float(value, self.name, self.minimum, self.strict, self.maximum)


HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("factors", 100, "dimension r of the space", int, 1, 65536, flag="--factors"),
    Hyperparameter("margin", 1.5, "hinge margin m on squared distances", float, 0.0, 100.0, flag="--margin"),
    Hyperparameter(
        "n_negatives",
        None,
        "sampled negatives U per positive pair (default: 0.2 / density of the training data, within 3-20, "
        "or 3-40 where items have 10+ interactions each)",
        int,
        1,
        10_000,
        flag="--negatives",
        optional=True,
    ),
    Hyperparameter(
        "learning_rate",
        0.1,
        "step size (AdaGrad: about 0.1, Adam: about 1e-3)",
        float,
        0.0,
        100.0,
        True,
        flag="--learning-rate",
    ),
    Hyperparameter(
        "optimizer",
        "adagrad",
        "AdaGrad as in the paper, or Adam",
        str,
        choices=("adagrad", "adam"),
        flag="--optimizer",
    ),
    Hyperparameter(
        "adaptive_margin",
        0.0,
        "learn a margin per user, rewarded by this much per pair (SML, Li et al. 2020; 0: one fixed margin)",
        float,
        0.0,
        100.0,
        flag="--adaptive-margin",
    ),
    Hyperparameter(
        "negative_popularity",
        0.0,
        "draw negatives in proportion to popularity^this (Tran et al.'s two-stage sampling; 0: uniform)",
        float,
        0.0,
        4.0,
        flag="--negative-popularity",
    ),
    Hyperparameter("batch_size", 2048, "positive pairs per step", int, 1, 1 << 24, flag="--batch-size"),
    Hyperparameter("epochs", 200, "upper bound on passes over the training pairs", int, 1, 1_000_000, flag="--epochs"),
    Hyperparameter("lambda_c", 10.0, "weight of the covariance regulariser", float, 0.0, 1e6, flag="--lambda-c"),
    Hyperparameter(
        "covariance_rows",
        "sampled",
        "covariance over all user and item rows, the batch's rows, or a uniform sample of rows",
        str,
        choices=("all", "batch", "sampled"),
        flag="--covariance-rows",
    ),
    Hyperparameter(
        "covariance_sample",
        4096,
        "rows drawn per step for the covariance when covariance_rows='sampled'",
        int,
        2,
        1 << 24,
    ),
    Hyperparameter(
        "binary",
        False,
        "ignore the values of user_items (True), or draw positives in proportion to log(1 + value)",
        bool,
    ),
    Hyperparameter("rank_weighted", True, "multiply each pair's hinge by the WARP weight", bool),
    Hyperparameter("hardest_only", True, "only the hardest negative counts (else every impostor)", bool),
    Hyperparameter("max_norm", 1.0, "radius of the ball the vectors are kept in", float, 0.0, 1e6, True),
    Hyperparameter("lambda_f", 1.0, "weight of the feature loss (CML+F)", float, 0.0, 1e6, flag="--lambda-f"),
    Hyperparameter("lambda_g", 1.0, "weight of the user-feature loss", float, 0.0, 1e6, flag="--lambda-g"),
    Hyperparameter("feature_hidden", 256, "hidden width of the feature network", int, 1, 1 << 20),
    Hyperparameter("feature_dropout", 0.5, "dropout of the feature network's hidden layer", float, 0.0, 0.99),
    Hyperparameter(
        "feature_tie_below",
        0,
        "items with fewer training interactions take their vector from the feature network (0: none)",
        int,
        0,
        1 << 31,
    ),
    Hyperparameter(
        "fold_in_epochs",
        20,
        "passes over a new row's interactions when folding it in (recalculate_user, partial_fit_*)",
        int,
        0,
        100_000,
    ),
    Hyperparameter("eval_every", 2, "epochs between validation checks", int, 1, 1_000_000, flag="--eval-every"),
    Hyperparameter("patience", 5, "evaluations without gain before stopping", int, 1, 1_000_000, flag="--patience"),
    Hyperparameter(
        "tolerance",
        0.01,
        "without validation data: relative fall of the training loss a check must show to count as progress",
        float,
        0.0,
        1.0,
    ),
    Hyperparameter("eval_k", 50, "recall cut-off used for model selection", int, 1, 1_000_000),
    Hyperparameter(
        "eval_users",
        30_000,
        "validation users sampled for model selection (0: all)",
        int,
        0,
        1 << 40,
        flag="--eval-users",
    ),
    Hyperparameter("num_threads", 0, "CPU threads (0: all cores)", int, 0, MAX_THREADS, flag="--threads"),
    Hyperparameter(
        "random_state",
        0,
        "seed of the initialisation, sampler and evaluation sample",
        int,
        0,
        (1 << 63) - 1,
        flag="--seed",
    ),
)

_BY_NAME = {p.name: p for p in HYPERPARAMETERS}


def defaults() -> dict[str, Any]:
    """Every hyper-parameter's default."""
    return {p.name: p.default for p in HYPERPARAMETERS}


def check_hyperparameters(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked and converted, one by one, in declaration order."""
    unknown = sorted(set(values) - set(_BY_NAME))
    if unknown:
        raise TypeError(f"unknown hyper-parameter(s) {unknown}; known: {sorted(_BY_NAME)}")
    return {name: _BY_NAME[name].check(value) for name, value in values.items()}
