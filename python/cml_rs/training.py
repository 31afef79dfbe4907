"""The training loop of CML: WARP batches in, AdaGrad (or Adam) steps out.

One :class:`Trainer` runs one fit of a :class:`cml_rs.CML` model: each step
takes a batch of the Rust sampler, computes the metric loss on the hardest
of U sampled negatives weighted by the WARP rank estimate, adds the
covariance regulariser and (for CML+F) the feature loss, steps the
optimiser and clips every vector back into the ball (Hsieh et al. 2017).
Between epochs it evaluates validation recall, keeps the best weights,
stops after ``patience`` evaluations without improvement, reports progress
and calls the user's callback. A step whose loss is not finite rolls the
model back to the start of its epoch and raises ``FloatingPointError``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from .evaluation import ranking_metrics_at_k
from .nn import CMLEmbedding, clip_rows, covariance_loss, feature_loss, torch_sparse_rows, warp_metric_loss
from .sampling import WarpSampler

if TYPE_CHECKING:
    from .model import CollaborativeMetricLearning

__all__ = ["Trainer", "fold_in"]

Callback = Callable[[int, float, float, dict], Any]
Snapshot = list[dict[str, torch.Tensor]]


class Trainer:
    """The state of one fit: optimiser, sampler, early stopping, history."""

    def __init__(
        self,
        model: CollaborativeMetricLearning,
        train: sp.csr_matrix,
        validation: sp.csr_matrix | None,
        features: torch.Tensor | None,
    ) -> None:
        self.model = model
        self.train = train
        self.validation = validation
        self.features = features
        self.n_items = train.shape[1]
        self.optimizer = _optimizer(model)
        self.sampler = WarpSampler(
            train,
            batch_size=model.batch_size,
            n_negatives=model.n_negatives,
            seed=model.random_state,
            num_threads=model.num_threads,
            weighted=not model.binary,
        )
        self.eval_users = _evaluation_users(validation, model.eval_users, model.random_state)
        self.best_recall = -1.0
        self.best_loss = float("inf")
        self.best_state: Snapshot | None = None
        self.stale = 0
        self.latest_recall: float | None = None

    # ------------------------------------------------------------------ one step

    def loss(self, batch: tuple[np.ndarray, ...]) -> torch.Tensor:
        """L = L_m + lambda_c L_c (+ lambda_f L_f) of one batch."""
        model, embedding = self.model, self.model.embedding_
        users, positives, negatives = (torch.from_numpy(a).to(model.device, non_blocking=True) for a in batch)
        loss = embedding.warp_loss(
            users, positives, negatives, model.margin, self.n_items, model.hardest_only, model.rank_weighted
        )
        if model.lambda_c > 0:
            if model.covariance_rows == "all":
                penalty = covariance_loss(embedding.users, embedding.items)
            else:
                penalty = covariance_loss(*_batch_rows(embedding, batch))
            loss = loss + model.lambda_c * penalty
        if self.features is not None and model.lambda_f > 0:
            loss = loss + model.lambda_f * feature_loss(model.projector_(self.features), embedding.items)
        return loss

    def step(self, batch: tuple[np.ndarray, ...]) -> float:
        """One optimiser step on ``batch``; returns its loss (NaN or inf is the caller's to handle)."""
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            return float(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.embedding_.clip_to_ball()
        return float(loss.detach())

    # ------------------------------------------------------------------ epochs

    def run_epoch(self, epoch: int) -> float:
        """One pass over the training pairs; rolls back and raises on divergence."""
        model = self.model
        last_good = snapshot(model)
        epoch_loss = 0.0
        for step, batch in enumerate(self.sampler):
            loss = self.step(batch)
            if not np.isfinite(loss):
                restore(model, last_good)
                raise FloatingPointError(
                    f"the loss became {loss} at epoch {epoch}, step {step}; the model keeps the "
                    f"vectors from the start of this epoch. Lower learning_rate (now {model.learning_rate}) "
                    f"or lambda_c (now {model.lambda_c})"
                )
            epoch_loss += loss
        if not _all_finite(model.embedding_):
            restore(model, last_good)
            raise FloatingPointError(
                f"the vectors became NaN or infinite during epoch {epoch}; the model keeps the vectors "
                f"from the start of this epoch. Lower learning_rate (now {model.learning_rate})"
            )
        return epoch_loss

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Validation metrics at ``eval_k``, and the early-stopping bookkeeping."""
        model = self.model
        result = ranking_metrics_at_k(
            model, self.train, self.validation, K=model.eval_k, users=self.eval_users, num_threads=model.num_threads
        )
        metrics = {f"{name}@{model.eval_k}": result[name] for name in ("recall", "precision", "ndcg", "map")}
        recall = self.latest_recall = result["recall"]
        if recall > self.best_recall:
            self.best_recall, self.best_state, self.stale = recall, snapshot(model), 0
            model.best_epoch_ = epoch
        else:
            self.stale += 1
        return metrics

    def loss_plateaued(self, epoch_loss: float) -> bool:
        """Without validation data: whether the training loss has failed to fall by
        ``tolerance`` (relative) below its best for ``patience`` checks in a row."""
        model = self.model
        if epoch_loss < self.best_loss * (1.0 - model.tolerance):
            self.best_loss, self.stale = epoch_loss, 0
        else:
            self.stale += 1
        return self.stale >= model.patience

    def run(self, show_progress: bool, callback: Callback | None) -> None:
        """Epochs until ``epochs``, early stopping or the callback says stop; keeps the best state.

        Every ``eval_every`` epochs: with validation data, recall@``eval_k`` is
        measured and the best weights kept; without, the training loss is
        compared with its best (:meth:`loss_plateaued`). Either way training
        stops after ``patience`` checks without progress.
        """
        from tqdm.auto import tqdm

        model = self.model
        model.history_, model.best_epoch_ = [], None
        report = _callback_caller(callback)
        if self.validation is not None:
            rule = f"stops when validation recall@{model.eval_k} stalls"
        else:
            rule = f"no validation: stops when the loss falls < {model.tolerance:.1%} in {model.patience} checks"
        start = time.perf_counter()
        bar = tqdm(total=model.epochs, disable=not show_progress, unit="epoch", desc=f"CML ({rule})")
        try:
            for epoch in range(model.epochs):
                epoch_loss = self.run_epoch(epoch)
                metrics: dict[str, float] = {}
                check = (epoch + 1) % model.eval_every == 0 or epoch + 1 == model.epochs
                if self.validation is not None and check:
                    metrics = self.evaluate(epoch)
                plateaued = self.validation is None and check and self.loss_plateaued(epoch_loss)
                elapsed = time.perf_counter() - start
                model.history_.append({"epoch": epoch, "loss": epoch_loss, "elapsed": elapsed, **metrics})
                postfix = {"loss": f"{epoch_loss:.4g}"}
                if self.latest_recall is not None:
                    postfix[f"val_recall@{model.eval_k}"] = f"{self.latest_recall:.4f}"
                    postfix["best"] = f"{self.best_recall:.4f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if report(epoch, elapsed, epoch_loss, metrics) is False:
                    break
                if plateaued or (self.validation is not None and self.stale >= model.patience):
                    break
        finally:
            bar.close()
        if self.best_state is not None:
            restore(model, self.best_state)


def _callback_caller(callback: Callback | None) -> Callable[[int, float, float, dict], Any]:
    """Calls ``callback`` with as many of ``(epoch, elapsed, loss, metrics)`` as it takes:
    implicit's callbacks take ``(iteration, elapsed)`` or ``(iteration, elapsed, loss)``."""
    if callback is None:
        return lambda *_: None
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        return callback
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return callback
    positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
    if positional >= 4:
        return callback
    if positional < 2:
        raise TypeError(
            f"callback must take (epoch, elapsed_seconds[, loss[, metrics]]), but {callback!r} takes {positional} "
            f"positional argument(s)"
        )
    return lambda *values: callback(*values[:positional])


def _optimizer(model: CollaborativeMetricLearning) -> torch.optim.Optimizer:
    params = list(model.embedding_.parameters())
    if model.projector_ is not None:
        params += list(model.projector_.parameters())
    if model.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=model.learning_rate, initial_accumulator_value=0.0)
    return torch.optim.Adam(params, lr=model.learning_rate)


def _evaluation_users(validation: sp.csr_matrix | None, eval_users: int, seed: int) -> np.ndarray | None:
    """A fixed sample of users with validation items (all when eval_users is 0)."""
    if validation is None:
        return None
    candidates = np.flatnonzero(np.diff(validation.indptr))
    if eval_users == 0 or eval_users >= len(candidates):
        return candidates
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, eval_users, replace=False))


def _batch_rows(embedding: CMLEmbedding, batch: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct user and item vectors a batch touches."""
    users, positives, negatives = batch
    device = embedding.users.device
    item_ids = torch.from_numpy(np.unique(np.concatenate([positives, negatives.ravel()]))).to(device)
    user_ids = torch.from_numpy(np.unique(users)).to(device)
    return embedding.user_rows(user_ids), embedding.item_rows(item_ids)


def snapshot(model: CollaborativeMetricLearning) -> Snapshot:
    """Copies of the model's trainable state (embedding, feature network)."""
    parts = [model.embedding_.state_dict()]
    if model.projector_ is not None:
        parts.append(model.projector_.state_dict())
    return [{k: v.detach().clone() for k, v in part.items()} for part in parts]


def restore(model: CollaborativeMetricLearning, state: Snapshot) -> None:
    """Puts back a :func:`snapshot`."""
    model.embedding_.load_state_dict(state[0])
    if model.projector_ is not None and len(state) > 1:
        model.projector_.load_state_dict(state[1])


def _all_finite(embedding: CMLEmbedding) -> bool:
    return bool(torch.isfinite(embedding.users).all() and torch.isfinite(embedding.items).all())


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Caps torch's intra-op threads for the duration (0: all cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fold_in(
    model: CollaborativeMetricLearning, interactions: sp.csr_matrix, side: str, epochs: int | None = None
) -> torch.Tensor:
    """Vectors for new or changed rows, learned with every other vector frozen.

    ``interactions`` has one row per vector to learn; its columns are the
    other side's ids (items when ``side`` is "users", users when "items").
    Each row starts at the centroid of the vectors it interacted with (a user
    sits near its items) and is refined by the model's metric loss against
    negatives drawn from the other side: ``epochs`` passes (default
    ``fold_in_epochs``) of AdaGrad over its interactions, then clipped to the
    ball. Rows without interactions stay at the centroid of the other side.
    The covariance term is left out: a few rows barely move it.
    """
    epochs = model.fold_in_epochs if epochs is None else epochs
    others = (model.embedding_.items if side == "users" else model.embedding_.users).detach()
    n_rows = interactions.shape[0]
    counts = torch.from_numpy(np.diff(interactions.indptr).astype(np.float32)).to(others.device)
    sums = torch_sparse_rows(interactions, others.device) @ others
    fallback = others.mean(dim=0, keepdim=True).expand(n_rows, -1)
    start = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], fallback)
    vectors = torch.nn.Parameter(clip_rows(start.clone(), model.max_norm))
    if interactions.nnz == 0 or epochs == 0:
        return vectors.detach()
    # A row that holds every column has no negative: its centroid is all there is to learn.
    full = np.diff(interactions.indptr) >= interactions.shape[1]
    train = interactions.copy()
    if full.any():
        train = sp.diags((~full).astype(np.float32)) @ train
        train.eliminate_zeros()
        if train.nnz == 0:
            return vectors.detach()
    sampler = WarpSampler(
        train,
        batch_size=model.batch_size,
        n_negatives=model.n_negatives,
        seed=model.random_state,
        num_threads=model.num_threads,
    )
    optimizer = torch.optim.Adagrad([vectors], lr=model.learning_rate, initial_accumulator_value=0.0)
    n_others = others.shape[0]
    for _ in range(epochs):
        for rows, positives, negatives in sampler:
            rows, positives, negatives = (torch.from_numpy(a).to(others.device) for a in (rows, positives, negatives))
            anchors = torch.nn.functional.embedding(rows, vectors)
            pos_dist = (anchors - others[positives]).pow(2).sum(-1)
            neg_dist = (anchors.unsqueeze(1) - others[negatives]).pow(2).sum(-1)
            loss = warp_metric_loss(pos_dist, neg_dist, model.margin, n_others, model.hardest_only, model.rank_weighted)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                vectors.copy_(clip_rows(vectors, model.max_norm))
    return vectors.detach()
