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
import hashlib
import inspect
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from ._io import NpzReader, meta_int, open_npz, save_npz
from .evaluation import ranking_metrics_at_k
from .nn import (
    CMLEmbedding,
    clip_rows,
    covariance_loss,
    feature_loss,
    torch_sparse_rows,
)
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
        item_features: sp.csr_matrix | None = None,
        user_features: sp.csr_matrix | None = None,
        sampler: WarpSampler | None = None,
        catalogue_size: int | None = None,
        identity: str = "",
    ) -> None:
        self.model = model
        self.train = train
        self.validation = validation
        self.item_features = item_features
        self.user_features = user_features
        self.n_items = train.shape[1]
        # The items the WARP rank is estimated over: all of them, also when a
        # shard of the model sees one block of them at a time (cml_rs.distributed).
        self.catalogue_size = catalogue_size or self.n_items
        self.identity = identity  # told apart in checkpoints (a shard's rank)
        self.sparse = model.covariance_rows != "all"
        # Per-user margins (adaptive_margin > 0): training state only, ranking
        # uses distances alone, so they are kept here and in checkpoints.
        self.margins: torch.nn.Parameter | None = None
        if model.adaptive_margin > 0:
            n_users = model.embedding_.users.shape[0]
            self.margins = torch.nn.Parameter(torch.full((n_users, 1), float(model.margin), device=model.device))
        self.optimizer = _optimizer(model, self.sparse, [] if self.margins is None else [self.margins])
        self.sampler = sampler or warp_sampler(model, train)
        self.checkpoint_meta: dict[str, Any] = {}  # more to record in checkpoints (a shard's place)
        self.eval_users = _evaluation_users(validation, model.eval_users, model.random_state)
        self.best_recall = -1.0
        self.best_loss = float("inf")
        self.best_state: Snapshot | None = None
        self.stale = 0
        self.latest_recall: float | None = None

    # ------------------------------------------------------------------ one step

    def loss(self, batch: tuple[np.ndarray, ...], epoch: int = 0, step: int = 0) -> tuple[torch.Tensor, list]:
        """L = L_m + lambda_c L_c (+ lambda_f L_f) of one batch, and the rows it touches.

        The cost is O(batch), whatever the size of the model: the negatives'
        distances are computed without autograd (natively on the CPU), and
        only the rows that take a gradient (the batch's users, positives and
        chosen negatives, and the covariance sample) are looked up, with
        sparse gradients. With ``covariance_rows="all"`` the penalty, and so
        the step, touches every row.
        """
        model, embedding = self.model, self.model.embedding_
        users, positives, negatives = batch
        user_ids, user_local = np.unique(users, return_inverse=True)
        margin: float | torch.Tensor = model.margin
        if self.margins is not None:
            margin_rows = self.rows(self.margins, user_ids)
            margin = torch.nn.functional.embedding(torch.from_numpy(user_local).to(model.device), margin_rows)[:, 0]
        weights, targets = self.hardest(users, positives, negatives, margin)
        item_ids, item_local = np.unique(np.concatenate([positives, targets.ravel()]), return_inverse=True)
        user_rows = self.rows(embedding.users, user_ids)
        item_rows = self.rows(embedding.items, item_ids)
        device = model.device
        u = torch.nn.functional.embedding(torch.from_numpy(user_local).to(device), user_rows)
        local = torch.from_numpy(item_local).to(device)
        p = torch.nn.functional.embedding(local[: len(positives)], item_rows)
        n = torch.nn.functional.embedding(local[len(positives) :].reshape(targets.shape), item_rows)
        pos_dist = (u - p).pow(2).sum(-1)
        if model.hardest_only:
            pair_loss = torch.relu(margin + pos_dist - (u - n).pow(2).sum(-1))
        else:
            hinge = torch.relu((margin + pos_dist).unsqueeze(1) - (u.unsqueeze(1) - n).pow(2).sum(-1))
            pair_loss = hinge.sum(dim=1) / (hinge > 0).sum(dim=1).clamp_min(1)
        loss = (pair_loss * weights).sum() if model.rank_weighted else pair_loss.sum()
        touched = [("users", user_ids), ("items", item_ids)]
        if isinstance(margin, torch.Tensor):
            # SML's reward for wide margins: a user's margin grows until the
            # (weighted) share of its pairs with an active hinge reaches gamma.
            loss = loss - model.adaptive_margin * margin.sum()
            touched.append(("margins", user_ids))
        if model.lambda_c > 0:
            if model.covariance_rows == "all":
                penalty = covariance_loss(embedding.users, embedding.items)
            elif model.covariance_rows == "batch":
                penalty = covariance_loss(user_rows, item_rows)
            else:
                sample_users, sample_items = self.covariance_sample(epoch, step)
                penalty = covariance_loss(
                    self.rows(embedding.users, sample_users), self.rows(embedding.items, sample_items)
                )
                touched += [("users", sample_users), ("items", sample_items)]
            loss = loss + model.lambda_c * penalty
        if self.item_features is not None and model.lambda_f > 0:
            projected = model.item_network_(self.item_features[item_ids])
            loss = loss + model.lambda_f * feature_loss(projected, item_rows)
        if self.user_features is not None and model.lambda_g > 0:
            projected = model.user_network_(self.user_features[user_ids])
            loss = loss + model.lambda_g * feature_loss(projected, user_rows)
        return loss, touched

    def hardest(
        self,
        users: np.ndarray,
        positives: np.ndarray,
        negatives: np.ndarray,
        margin: float | torch.Tensor,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The WARP weights of the batch's pairs, and the negatives that take a gradient:
        the hardest of each pair's (or all of them without ``hardest_only``). ``margin``
        is the model's, or one per pair (adaptive margins)."""
        model, embedding = self.model, self.model.embedding_
        with torch.no_grad():
            u = embedding.users[torch.from_numpy(users).to(model.device)]
            pos_dist = (u - embedding.items[torch.from_numpy(positives).to(model.device)]).pow(2).sum(-1)
            if isinstance(margin, torch.Tensor):
                # An impostor is within margin_u + d(u, i): fold the pair's margin into d.
                pos_dist, margin = pos_dist + margin.detach(), 0.0
            weights, hardest = embedding.hardest_negatives(
                u, torch.from_numpy(negatives).to(model.device), pos_dist, margin, self.catalogue_size
            )
            hardest = hardest.cpu().numpy()
        targets = negatives[np.arange(len(negatives)), hardest] if model.hardest_only else negatives
        return weights.to(model.device), targets

    def rows(self, table: torch.nn.Parameter, ids: np.ndarray) -> torch.Tensor:
        """Rows ``ids`` of ``table``, differentiable, with a sparse gradient unless every row moves anyway."""
        index = torch.from_numpy(ids).to(self.model.device)
        return torch.nn.functional.embedding(index, table, sparse=self.sparse)

    def covariance_sample(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``covariance_sample`` rows drawn uniformly from all users and items, from a
        stream keyed by (seed, epoch, step): the same for a seed, whatever else ran."""
        n_users, n_items = self.model.embedding_.users.shape[0], self.n_items
        total = n_users + n_items
        size = min(self.model.covariance_sample, total)
        rng = np.random.default_rng([self.model.random_state, epoch, step])
        rows = np.sort(rng.choice(total, size, replace=False))
        return rows[rows < n_users], rows[rows >= n_users] - n_users

    def step(self, batch: tuple[np.ndarray, ...], epoch: int = 0, step: int = 0) -> float:
        """One optimiser step on ``batch``; returns its loss. A step whose loss or gradient is
        not finite is not taken, and raises FloatingPointError (the model keeps its vectors)."""
        model = self.model
        loss, touched = self.loss(batch, epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if np.isfinite(value):
            loss.backward()
        if not (np.isfinite(value) and _finite_gradients(self.optimizer)):
            raise FloatingPointError(
                f"the loss or its gradient became {value if not np.isfinite(value) else 'non-finite'} at epoch "
                f"{epoch}, step {step}; the step was not taken and the model keeps its vectors. "
                f"Lower learning_rate (now {model.learning_rate}) or lambda_c (now {model.lambda_c})"
            )
        # torch's sparse AdaGrad builds sparse tensors of known-good indices; say
        # so explicitly (it warns when the global default is left implicit).
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            self.optimizer.step()
        with torch.no_grad():
            if not self.sparse:
                model.embedding_.clip_to_ball()
            else:
                for side, ids in touched:
                    if side == "margins":  # between 0 and the largest squared distance in the ball
                        index = torch.from_numpy(ids).to(model.device)
                        self.margins[index] = self.margins[index].clamp(0.0, 4.0 * model.max_norm**2)
                        continue
                    table = model.embedding_.users if side == "users" else model.embedding_.items
                    index = torch.from_numpy(ids).to(model.device)
                    table[index] = clip_rows(table[index], model.max_norm)
            if self.margins is not None and not self.sparse:
                self.margins.clamp_(0.0, 4.0 * model.max_norm**2)
        return value

    # ------------------------------------------------------------------ epochs

    def run_epoch(self, epoch: int) -> float:
        """One pass over the training pairs (raises FloatingPointError on divergence)."""
        self.sampler.set_epoch(epoch)
        return sum(self.step(batch, epoch, step) for step, batch in enumerate(self.sampler))

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

    def run(
        self,
        show_progress: bool,
        callback: Callback | None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        first_epoch: int = 0,
        restore_best: bool = True,
    ) -> None:
        """Epochs until ``epochs``, early stopping or the callback says stop; keeps the best state.

        Every ``eval_every`` epochs: with validation data, recall@``eval_k`` is
        measured and the best weights kept; without, the training loss is
        compared with its best (:meth:`loss_plateaued`). Either way training
        stops after ``patience`` checks without progress. With ``checkpoint``,
        the whole state of the fit is written there (atomically) every
        ``checkpoint_every`` epochs and when it ends; a fit started with an
        existing checkpoint of the same data and settings resumes from it and
        ends exactly where an uninterrupted fit would. ``first_epoch`` > 0
        continues this trainer's own fit (the tuner's rounds), and
        ``restore_best=False`` leaves the latest weights in place.
        """
        from tqdm.auto import tqdm

        model = self.model
        if first_epoch == 0:
            model.history_, model.best_epoch_ = [], None
        if checkpoint is not None and Path(checkpoint).exists():
            first_epoch, finished = self.load_checkpoint(checkpoint)
            if finished:
                if self.best_state is not None:
                    restore(model, self.best_state)
                return
        report = _callback_caller(callback)
        if self.validation is not None:
            rule = f"stops when validation recall@{model.eval_k} stalls"
        else:
            rule = f"no validation: stops when the loss falls < {model.tolerance:.1%} in {model.patience} checks"
        start = time.perf_counter() - (model.history_[-1]["elapsed"] if model.history_ else 0.0)
        bar = tqdm(
            total=model.epochs, initial=first_epoch, disable=not show_progress, unit="epoch", desc=f"CML ({rule})"
        )
        try:
            for epoch in range(first_epoch, model.epochs):
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
                stop = report(epoch, elapsed, epoch_loss, metrics) is False
                stop = stop or plateaued or (self.validation is not None and self.stale >= model.patience)
                last = stop or epoch + 1 == model.epochs
                if checkpoint is not None and ((epoch + 1) % checkpoint_every == 0 or last):
                    self.save_checkpoint(checkpoint, epoch, finished=last)
                if stop:
                    break
        finally:
            bar.close()
        if restore_best and self.best_state is not None:
            restore(model, self.best_state)

    # ------------------------------------------------------------------ checkpoints

    def fingerprint(self) -> str:
        """A hash of the training and validation data and the settings, so a checkpoint
        is only ever resumed by the fit it came from."""
        digest = hashlib.sha256()
        digest_matrices(digest, (self.train, self.validation, self.item_features, self.user_features))
        settings = {k: v for k, v in self.model.hyperparameters().items() if k != "device"}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        digest.update(self.identity.encode())
        return digest.hexdigest()

    def save_checkpoint(self, path: str | os.PathLike, epoch: int, finished: bool) -> None:
        """Writes everything the rest of the fit depends on: the model, the optimiser,
        the best state so far, the early-stopping counters, the history and the torch
        random state (dropout); the data's streams are keyed by epoch and need none."""
        model = self.model
        tree = {
            "model": _module_state(model),
            "best": self.best_state,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "margins": None if self.margins is None else self.margins.detach(),
        }
        arrays: dict[str, np.ndarray] = {}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint(),
            "epoch": epoch,
            "finished": finished,
            "best_recall": self.best_recall,
            "best_loss": self.best_loss if np.isfinite(self.best_loss) else None,
            "stale": self.stale,
            "latest_recall": self.latest_recall,
            "best_epoch": model.best_epoch_,
            "history": model.history_,
            "state": _flatten(tree, "", arrays),
            **self.checkpoint_meta,
        }
        save_npz(path, arrays, meta)

    def load_checkpoint(self, path: str | os.PathLike) -> tuple[int, bool]:
        """Restores a checkpoint of this fit; returns the next epoch and whether it had finished."""
        model = self.model
        with open_npz(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION) as reader:
            meta = reader.meta
            if meta.get("fingerprint") != self.fingerprint():
                raise ValueError(
                    f"{reader.name} is the checkpoint of another fit (other data or settings); "
                    f"delete it or pass another checkpoint path to start over"
                )
            try:
                tree = _unflatten(meta["state"], reader)
                _load_module_state(model, tree["model"])
                self.best_state = tree["best"]
                if self.margins is not None:
                    with torch.no_grad():
                        self.margins.copy_(tree["margins"])
                self.optimizer.load_state_dict(tree["optimizer"])
                torch.set_rng_state(tree["torch_rng"])
                epoch = meta_int(meta, "epoch", reader.name)
                self.best_recall = float(meta["best_recall"])
                self.best_loss = float("inf") if meta["best_loss"] is None else float(meta["best_loss"])
                self.stale = meta_int(meta, "stale", reader.name)
                self.latest_recall = None if meta["latest_recall"] is None else float(meta["latest_recall"])
                model.best_epoch_ = meta_int(meta, "best_epoch", reader.name, optional=True)
                model.history_ = list(meta["history"])
                finished = bool(meta["finished"])
            except (KeyError, TypeError, RuntimeError) as error:
                raise ValueError(
                    f"{reader.name}: the checkpoint is incomplete ({error}); the file is damaged"
                ) from None
        return epoch + 1, finished


#: Of U negatives drawn uniformly, the hardest is more and more often an item the user
#: would like but has not met (a false negative) as U x density grows, so
#: ``n_negatives=None`` keeps U x density near this. Chosen on the validation splits
#: of the four real panel sets (benches/RESULTS.md): ml-100k (2.1% dense) gains 13% at
#: U = 10 over 20, ml-1m-implicit (1.6%) needs U >= 10, ml-latest-small (0.5%) and
#: citeulike-t (0.04%) want 20; checked on synthetic-dense (2.0%: +3.6% at U = 10).
NEGATIVES_TIMES_DENSITY = 0.2
#: The range of that U: below 3 the hardest negative is barely hard. Above 20 it lost
#: recall on the sparsest sets whose items have few interactions each (citeulike-t: U =
#: 40 below 10 and 20; ml-latest-small: 40 lost 5%).
AUTO_NEGATIVES = (3, 20)
#: Where the items have this many training interactions each on average, U may rise to
#: WELL_SEEN_CAP instead: on validation U = 40 beat 20 on synthetic-sparse (25 an item,
#: +1.4%) and synthetic-medium (59, +1.3%), and lost on citeulike-t (3.4, -2.7%) and
#: ml-latest-small (3.0, -5.1%); 10 lies between the two groups. Gowalla (17.5), left out
#: of that choice (though probed first), is the check: +10.6% at U = 40. The cap: both
#: synthetic sets collapse at U = 80 (benches/RESULTS.md).
WELL_SEEN_ITEMS = 10.0
WELL_SEEN_CAP = 40


def negatives_for(train: sp.csr_matrix) -> int:
    """The U that ``n_negatives=None`` gives for ``train``: 0.2 / density, within [3, 20],
    or within [3, 40] where the items have at least 10 interactions each on average."""
    n_users, n_items = train.shape
    interactions = int(np.count_nonzero(train.data > 0))
    density = interactions / max(1, n_users * n_items)
    low, high = AUTO_NEGATIVES
    if interactions >= WELL_SEEN_ITEMS * n_items:
        high = WELL_SEEN_CAP
    return low if density == 0 else int(min(high, max(low, round(NEGATIVES_TIMES_DENSITY / density))))


def resolve_negatives(model: CollaborativeMetricLearning, train: sp.csr_matrix) -> int:
    """Sets ``model.n_negatives_``, the U its fit samples: ``n_negatives``, or if that is None
    the density rule on the whole training matrix ``train``."""
    model.n_negatives_ = model.n_negatives if model.n_negatives is not None else negatives_for(train)
    return model.n_negatives_


def warp_sampler(model: CollaborativeMetricLearning, train: sp.csr_matrix, seed: int | None = None) -> WarpSampler:
    """The WARP sampler of ``train`` with ``model``'s settings (its seed unless ``seed``).
    U is ``model.n_negatives_`` (see :func:`resolve_negatives`) once the fit has set it."""
    n_negatives = model.n_negatives_ if model.n_negatives_ is not None else resolve_negatives(model, train)
    return WarpSampler(
        train,
        batch_size=model.batch_size,
        n_negatives=n_negatives,
        seed=model.random_state if seed is None else seed,
        num_threads=model.num_threads,
        weighted=not model.binary,
        popularity_exponent=model.negative_popularity,
    )


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


class _Optimizers(torch.optim.Optimizer):
    """Several optimisers stepped as one (SparseAdam for the embedding, Adam for the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.param_groups = [group for o in optimizers for group in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def _optimizer(
    model: CollaborativeMetricLearning, sparse: bool, tables: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """AdaGrad (sparse gradients welcome) or Adam (SparseAdam for sparse embedding gradients);
    ``tables`` are more parameters looked up like the embedding (per-user margins)."""
    embedding = list(model.embedding_.parameters()) + tables
    network = [p for n in (model.item_network_, model.user_network_) if n is not None for p in n.parameters()]
    if model.optimizer == "adagrad":
        return torch.optim.Adagrad(embedding + network, lr=model.learning_rate, initial_accumulator_value=0.0)
    if not sparse:
        return torch.optim.Adam(embedding + network, lr=model.learning_rate)
    adam = [torch.optim.SparseAdam(embedding, lr=model.learning_rate)]
    if network:
        adam.append(torch.optim.Adam(network, lr=model.learning_rate))
    return adam[0] if len(adam) == 1 else _Optimizers(*adam)


def _evaluation_users(validation: sp.csr_matrix | None, eval_users: int, seed: int) -> np.ndarray | None:
    """A fixed sample of users with validation items (all when eval_users is 0)."""
    if validation is None:
        return None
    candidates = np.flatnonzero(np.diff(validation.indptr))
    if eval_users == 0 or eval_users >= len(candidates):
        return candidates
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, eval_users, replace=False))


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient about to be applied is finite (only the stored values of a sparse one)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            values = grad._values() if grad.is_sparse else grad  # stored values, coalesced or not
            # NaN and inf propagate through a sum, so a finite sum proves every value
            # finite at a tenth of isfinite().all()'s cost; only a sum that overflowed
            # (or a real NaN) needs the element-wise check.
            if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
                return False
    return True


def digest_matrices(digest: Any, matrices: Any) -> None:
    """Feeds each CSR matrix (shape, structure and values), or a marker for None, into
    ``digest``: the data part of checkpoint fingerprints and of the ranks' data check."""
    for part in matrices:
        if part is None:
            digest.update(b"none")
            continue
        digest.update(np.asarray(part.shape, np.int64).tobytes())
        digest.update(np.ascontiguousarray(part.indptr, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(part.indices, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(part.data, dtype=np.float32).tobytes())


CHECKPOINT_FORMAT = "cml-rs-checkpoint"
CHECKPOINT_VERSION = 1


def _module_state(model: CollaborativeMetricLearning) -> Snapshot:
    """The trainable state as a list of state dicts (embedding, feature network)."""
    return snapshot(model)


def _load_module_state(model: CollaborativeMetricLearning, state: Snapshot) -> None:
    with torch.no_grad():
        restore(model, state)


def _flatten(value: Any, name: str, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` (nested dicts, lists, tensors, numbers) as JSON, each tensor stored in
    ``arrays`` under a name and replaced by a reference giving its name, shape and dtype."""
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
        arrays[name] = array
        return {"__array__": name, "shape": list(array.shape), "dtype": array.dtype.str}
    if isinstance(value, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{name}.k{i}", arrays), _flatten(v, f"{name}.{i}", arrays)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if isinstance(value, (list, tuple)):
        return {
            "__list__": [_flatten(v, f"{name}.{i}", arrays) for i, v in enumerate(value)],
            "tuple": isinstance(value, tuple),
        }
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _unflatten(value: Any, reader: NpzReader) -> Any:
    """The inverse of :func:`_flatten`, each array read with the shape it was declared with."""
    if isinstance(value, dict) and "__array__" in value:
        shape = tuple(int(n) for n in value["shape"])
        return torch.from_numpy(reader.array(str(value["__array__"]), shape, np.dtype(str(value["dtype"]))))
    if isinstance(value, dict) and "__dict__" in value:
        return {_unflatten(k, reader): _unflatten(v, reader) for k, v in value["__dict__"]}
    if isinstance(value, dict) and "__list__" in value:
        items = [_unflatten(v, reader) for v in value["__list__"]]
        return tuple(items) if value.get("tuple") else items
    return value


def _modules(model: CollaborativeMetricLearning) -> list[torch.nn.Module | None]:
    """The trainable parts, in a fixed order: embedding, item network, user network."""
    return [model.embedding_, model.item_network_, model.user_network_]


def snapshot(model: CollaborativeMetricLearning) -> Snapshot:
    """Copies of the model's trainable state (embedding, feature networks; {} for an absent one)."""
    return [
        {k: v.detach().clone() for k, v in module.state_dict().items()} if module is not None else {}
        for module in _modules(model)
    ]


def restore(model: CollaborativeMetricLearning, state: Snapshot) -> None:
    """Puts back a :func:`snapshot`."""
    for module, part in zip(_modules(model), state):
        if module is not None:
            module.load_state_dict(part)


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
    model: CollaborativeMetricLearning,
    interactions: sp.csr_matrix,
    side: str,
    epochs: int | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vectors for new or changed rows, learned with every other vector frozen.

    ``interactions`` has one row per vector to learn; its columns are the
    other side's ids (items when ``side`` is "users", users when "items").
    Each row starts at ``start`` (e.g. the feature network's output) or else at
    the centroid of the vectors it interacted with (a user sits near its
    items), and is refined by the model's metric loss against
    negatives drawn from the other side: ``epochs`` passes (default
    ``fold_in_epochs``) of AdaGrad over its interactions, then clipped to the
    ball. Rows without interactions stay at the centroid of the other side.
    Unless the model is ``binary``, interactions are drawn in proportion to
    ``log(1 + value)``, as in the fit (rows whose values are all 0 stay where
    they start). The covariance term is left out: a few rows barely move it.
    """
    if interactions.nnz and interactions.data.min() < 0:
        name = "user_items" if side == "users" else "item_users"
        raise ValueError(
            f"{name} holds negative values (as low as {interactions.data.min()}); implicit feedback and "
            f"confidence weights are >= 0 (drop or zero the negative entries)"
        )
    epochs = model.fold_in_epochs if epochs is None else epochs
    others = (model.embedding_.items if side == "users" else model.embedding_.users).detach()
    n_rows = interactions.shape[0]
    counts = torch.from_numpy(np.diff(interactions.indptr).astype(np.float32)).to(others.device)
    sums = torch_sparse_rows(interactions, others.device) @ others
    if start is None:
        fallback = others.mean(dim=0, keepdim=True).expand(n_rows, -1)
        start = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], fallback)
    vectors = torch.nn.Parameter(clip_rows(start.to(others.device).clone(), model.max_norm))
    if interactions.nnz == 0 or epochs == 0:
        return vectors.detach()
    # A row that holds every column has no negative: its centroid is all there is to learn.
    lengths = np.diff(interactions.indptr)
    full = lengths >= interactions.shape[1]
    train = interactions.copy()
    if full.any():  # emptied; stored zeros elsewhere stay (known items, never negatives)
        kept = np.repeat(~full, lengths)
        indptr = np.concatenate([[0], np.cumsum(np.where(full, 0, lengths))])
        train = sp.csr_matrix((train.data[kept], train.indices[kept], indptr), shape=train.shape)
        if train.nnz == 0:
            return vectors.detach()
    weighted = not model.binary
    if weighted and not train.data.any():
        return vectors.detach()  # no pair would be drawn
    # The fit's U: the density rule on these few rows would give another.
    n_negatives = model.n_negatives_ or model.n_negatives
    if n_negatives is None:
        raise ValueError(
            "this model does not record how many negatives (U) its fit sampled; set its n_negatives to fold in"
        )
    sampler = WarpSampler(
        train,
        batch_size=model.batch_size,
        n_negatives=n_negatives,
        seed=model.random_state,
        num_threads=model.num_threads,
        weighted=weighted,
    )
    # The rows being learned play the users' part and the frozen other side the
    # items' (the loss is symmetric), so the cheap WARP path serves both sides.
    pair = CMLEmbedding.from_vectors(vectors, others, model.max_norm)
    pair.items.requires_grad_(False)
    vectors = pair.users
    optimizer = torch.optim.Adagrad([vectors], lr=model.learning_rate, initial_accumulator_value=0.0)
    for _ in range(epochs):
        for rows, positives, negatives in sampler:
            rows, positives, negatives = (torch.from_numpy(a).to(others.device) for a in (rows, positives, negatives))
            loss = pair.warp_loss(
                rows, positives, negatives, model.margin, others.shape[0], model.hardest_only, model.rank_weighted
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                vectors.copy_(clip_rows(vectors, model.max_norm))
    return vectors.detach()
