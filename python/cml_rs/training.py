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
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from .evaluation import ranking_metrics_at_k
from .nn import CMLEmbedding, covariance_loss, feature_loss
from .sampling import WarpSampler

if TYPE_CHECKING:
    from .model import CollaborativeMetricLearning

__all__ = ["Trainer"]

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
        )
        self.eval_users = _evaluation_users(validation, model.eval_users, model.random_state)
        self.best_recall = -1.0
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

    def run(self, show_progress: bool, callback: Callback | None) -> None:
        """Epochs until ``epochs``, early stopping or the callback says stop; keeps the best state."""
        from tqdm.auto import tqdm

        model = self.model
        model.history_, model.best_epoch_ = [], None
        start = time.perf_counter()
        bar = tqdm(total=model.epochs, disable=not show_progress, unit="epoch", desc="CML")
        try:
            for epoch in range(model.epochs):
                epoch_loss = self.run_epoch(epoch)
                metrics: dict[str, float] = {}
                if self.validation is not None and ((epoch + 1) % model.eval_every == 0 or epoch + 1 == model.epochs):
                    metrics = self.evaluate(epoch)
                elapsed = time.perf_counter() - start
                model.history_.append({"epoch": epoch, "loss": epoch_loss, "elapsed": elapsed, **metrics})
                postfix = {"loss": f"{epoch_loss:.4g}"}
                if self.latest_recall is not None:
                    postfix[f"val_recall@{model.eval_k}"] = f"{self.latest_recall:.4f}"
                    postfix["best"] = f"{self.best_recall:.4f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if callback is not None and callback(epoch, elapsed, epoch_loss, metrics) is False:
                    break
                if self.validation is not None and self.stale >= model.patience:
                    break
        finally:
            bar.close()
        if self.best_state is not None:
            restore(model, self.best_state)


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
