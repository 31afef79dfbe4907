"""Collaborative Metric Learning as a recommender with an implicit-style API.

    from cml_rs import CML
    model = CML()                               # paper defaults, see below
    model.fit(train, validation=valid)          # early stopping on validation recall
    ids, scores = model.recommend(user, train[user], N=10)

Training follows SPEC sections 1-3: WARP-weighted hinge on the hardest of U
sampled negatives (cml_rs.WarpSampler + rank weights), the covariance
regulariser, vectors clipped to the unit ball after every step, AdaGrad (or
Adam), and optionally item features (CML+F). Recommendation is nearest-item
search with an exact, LSH or HNSW backend.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from . import __version__
from ._checks import as_csr, check_num_threads, check_positive_int
from .datasets import _atomic_savez, _load_checked_npz
from .evaluation import ranking_metrics_at_k
from .nn import CMLEmbedding, FeatureProjector, covariance_loss, feature_loss
from .retrieval import Backend, build_index
from .sampling import WarpSampler

__all__ = ["CML", "CollaborativeMetricLearning"]

MODEL_FORMAT = "cml-rs-model"
MODEL_VERSION = 1

Callback = Callable[[int, float, float, dict], Any]


class CollaborativeMetricLearning:
    """Collaborative Metric Learning (Hsieh et al., WWW 2017).

    Users and items are vectors in one Euclidean space, inside the ball of
    radius ``max_norm``; a user is pulled towards the items it liked and pushes
    away the closest sampled negative that violates the margin, weighted by
    the WARP rank estimate. Scores are negative squared distances.

    Parameters
    ----------
    factors : int
        Dimension r (paper: 100).
    margin : float
        Hinge margin m on squared distances (paper: 0.5; default 1.5, see Notes).
    n_negatives : int
        Negatives U sampled per positive pair (paper: 20).
    learning_rate : float
        Step size (paper-era AdaGrad: 0.1; use about 1e-3 with Adam).
    optimizer : {"adagrad", "adam"}
        AdaGrad as in the paper, or Adam (reported to work where AdaGrad stalls on GPU).
    batch_size : int
        Positive pairs per step.
    epochs : int
        Upper bound on passes over the training pairs.
    lambda_c : float
        Weight of the covariance regulariser (paper: 10).
    covariance_rows : {"all", "batch"}
        Take the covariance over all user and item rows (default) or only the batch's rows.
    rank_weighted : bool
        Multiply each pair's hinge by the WARP weight log(rank + 1).
    hardest_only : bool
        Only the hardest negative counts (paper); otherwise every impostor, weighted by w / M.
    max_norm : float
        Radius of the ball the vectors are kept in (paper: 1).
    lambda_f, feature_hidden, feature_dropout :
        CML+F: weight of the feature loss, hidden width and dropout of the MLP f
        (paper: 1, 256, 0.5). Used when ``fit`` gets ``item_features``.
    eval_every : int
        Epochs between validation evaluations (with ``fit(validation=...)``).
    patience : int
        Evaluations without improvement before training stops.
    eval_k : int
        Recall cut-off used for model selection.
    eval_users : int
        Size of the fixed random sample of validation users (0: all).
    device : str or torch.device
        "cpu", "cuda", ...
    num_threads : int
        CPU threads for torch and the Rust kernels while fitting; 0 means all cores.
    random_state : int
        Seed of the initialisation, the sampler and the evaluation sample. On the
        CPU, a fit with the same seed and ``num_threads`` repeats bit for bit; with
        another thread count, torch sums in another order and the factors differ
        by rounding.

    Notes
    -----
    Defaults are the paper's (r = 100, U = 20, unit ball, hardest-negative WARP
    loss with rank weights, lambda_c = 10, AdaGrad at 0.1) except the margin:
    tuned on citeulike-t's validation split (benches/RESULTS.md), margin 0.5
    plateaus near recall@50 0.18, 1.0 near 0.27, and 1.5 near 0.29-0.30; 2.0
    and 2.5 are no better. Batches of 2,048 pairs train about as well per epoch
    as larger ones and converge sooner in wall time; lambda_c between 1 and 30
    and U between 10 and 20 change little, U = 50 lowers recall.
    """

    def __init__(
        self,
        factors: int = 100,
        margin: float = 1.5,
        n_negatives: int = 20,
        learning_rate: float = 0.1,
        optimizer: str = "adagrad",
        batch_size: int = 2048,
        epochs: int = 200,
        lambda_c: float = 10.0,
        covariance_rows: str = "all",
        rank_weighted: bool = True,
        hardest_only: bool = True,
        max_norm: float = 1.0,
        lambda_f: float = 1.0,
        feature_hidden: int = 256,
        feature_dropout: float = 0.5,
        eval_every: int = 2,
        patience: int = 5,
        eval_k: int = 50,
        eval_users: int = 0,
        device: str | torch.device = "cpu",
        num_threads: int = 0,
        random_state: int = 0,
    ) -> None:
        self.factors = check_positive_int(factors, "factors")
        self.margin = _finite(margin, "margin", minimum=0.0)
        self.n_negatives = check_positive_int(n_negatives, "n_negatives")
        self.learning_rate = _finite(learning_rate, "learning_rate", minimum=0.0, strict=True)
        if optimizer not in ("adagrad", "adam"):
            raise ValueError(f"optimizer must be 'adagrad' or 'adam', got {optimizer!r}")
        self.optimizer = optimizer
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.epochs = check_positive_int(epochs, "epochs")
        self.lambda_c = _finite(lambda_c, "lambda_c", minimum=0.0)
        if covariance_rows not in ("all", "batch"):
            raise ValueError(f"covariance_rows must be 'all' or 'batch', got {covariance_rows!r}")
        self.covariance_rows = covariance_rows
        self.rank_weighted = bool(rank_weighted)
        self.hardest_only = bool(hardest_only)
        self.max_norm = _finite(max_norm, "max_norm", minimum=0.0, strict=True)
        self.lambda_f = _finite(lambda_f, "lambda_f", minimum=0.0)
        self.feature_hidden = check_positive_int(feature_hidden, "feature_hidden")
        self.feature_dropout = _finite(feature_dropout, "feature_dropout", minimum=0.0)
        self.eval_every = check_positive_int(eval_every, "eval_every")
        self.patience = check_positive_int(patience, "patience")
        self.eval_k = check_positive_int(eval_k, "eval_k")
        self.eval_users = check_positive_int(eval_users, "eval_users", minimum=0)
        self.device = torch.device(device)
        self.num_threads = check_num_threads(num_threads)
        self.random_state = check_positive_int(random_state, "random_state", minimum=0)
        self.embedding_: CMLEmbedding | None = None
        self.projector_: FeatureProjector | None = None
        self.history_: list[dict[str, Any]] = []
        self.best_epoch_: int | None = None
        self._indexes: dict[Any, Any] = {}

    # ------------------------------------------------------------------ state

    @property
    def fitted(self) -> bool:
        return self.embedding_ is not None

    def _require_fitted(self) -> CMLEmbedding:
        if self.embedding_ is None:
            raise RuntimeError("the model is not fitted yet; call fit(user_items) or CML.load(path) first")
        return self.embedding_

    @property
    def user_factors(self) -> np.ndarray:
        """User vectors, float32 (n_users, factors) (a copy)."""
        return self._vectors("users").copy()

    @property
    def item_factors(self) -> np.ndarray:
        """Item vectors, float32 (n_items, factors) (a copy)."""
        return self._vectors("items").copy()

    def _vectors(self, kind: str) -> np.ndarray:
        """The live user or item vectors as numpy, without a copy on CPU (read only)."""
        embedding = self._require_fitted()
        weight = embedding.users if kind == "users" else embedding.items
        return weight.detach().cpu().numpy()

    @property
    def n_users(self) -> int:
        return int(self._require_fitted().users.shape[0])

    @property
    def n_items(self) -> int:
        return int(self._require_fitted().items.shape[0])

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable)."""
        params = {name: getattr(self, name) for name in _HYPERPARAMETERS}
        params["device"] = str(self.device)
        return params

    def __repr__(self) -> str:
        state = f"{self.n_users} users x {self.n_items} items" if self.fitted else "not fitted"
        return f"CollaborativeMetricLearning(factors={self.factors}, margin={self.margin}, {state})"

    # ------------------------------------------------------------------ training

    def fit(
        self,
        user_items: Any,
        show_progress: bool = True,
        callback: Callback | None = None,
        validation: Any | None = None,
        item_features: Any | None = None,
    ) -> CollaborativeMetricLearning:
        """Learns user and item vectors from implicit feedback.

        Parameters
        ----------
        user_items : scipy.sparse matrix (n_users, n_items)
            Positive interactions (values ignored).
        show_progress : bool
            A tqdm bar over epochs with the loss and the latest validation recall.
        callback : callable, optional
            ``callback(epoch, elapsed_seconds, loss, metrics)`` after each epoch;
            returning ``False`` stops training. ``metrics`` holds the validation
            metrics of that epoch, if any.
        validation : scipy.sparse matrix (n_users, n_items), optional
            Held-out interactions: every ``eval_every`` epochs, recall@``eval_k``
            on a fixed sample of users picks the best weights, and training stops
            after ``patience`` evaluations without improvement.
        item_features : scipy.sparse matrix (n_items, n_features), optional
            Item side information for CML+F.

        Notes
        -----
        On a model that is already fitted (and has no item features), ``fit``
        continues from the current vectors with a fresh optimiser, so the
        matrix must have the same users and items.

        Raises
        ------
        ValueError
            Wrong shapes (with a hint when the matrix looks transposed), an empty matrix.
        FloatingPointError
            The loss or the vectors became NaN / inf (the last good state is kept).
        """
        train = as_csr(user_items, "user_items")
        if train.nnz == 0:
            raise ValueError(f"user_items {train.shape} holds no interactions; there is nothing to learn from")
        if self.fitted and train.shape != (self.n_users, self.n_items):
            raise ValueError(_shape_hint("user_items", train.shape, (self.n_users, self.n_items)))
        if not np.all(np.isfinite(train.data)):
            raise ValueError("user_items holds NaN or infinite values")
        n_users, n_items = train.shape
        empty_users = int(np.sum(np.diff(train.indptr) == 0))
        if empty_users:
            warnings.warn(
                f"{empty_users} of {n_users} users have no interactions in user_items; "
                f"their vectors are learned only through the covariance term",
                stacklevel=2,
            )
        valid = as_csr(validation, "validation") if validation is not None else None
        if valid is not None and valid.shape != train.shape:
            raise ValueError(_shape_hint("validation", valid.shape, train.shape))
        features = None
        if item_features is not None:
            features = as_csr(item_features, "item_features")
            if features.shape[0] != n_items:
                raise ValueError(
                    f"item_features must have one row per item ({n_items}), got shape {features.shape}"
                    + ("; pass its transpose" if features.shape[1] == n_items else "")
                )

        with _torch_threads(self.num_threads):
            self._train(train, valid, features, show_progress, callback)
        self._indexes.clear()
        return self

    def _build(self, n_users: int, n_items: int, features: sp.csr_matrix | None) -> None:
        generator = torch.Generator().manual_seed(self.random_state)
        embedding = CMLEmbedding(n_users, n_items, self.factors, self.max_norm, generator=generator)
        self.projector_ = None
        if features is not None:
            torch.manual_seed(self.random_state)
            self.projector_ = FeatureProjector(
                features.shape[1], self.factors, self.feature_hidden, self.feature_dropout, self.max_norm
            )
            self.projector_.eval()
            with torch.no_grad():  # CML+F: item vectors start at f(x_j)
                embedding.items.copy_(self.projector_(_torch_sparse(features)))
            self.projector_.train()
            self.projector_.to(self.device)
        self.embedding_ = embedding.to(self.device)

    def _optimizer(self) -> torch.optim.Optimizer:
        params = list(self.embedding_.parameters())
        if self.projector_ is not None:
            params += list(self.projector_.parameters())
        if self.optimizer == "adagrad":
            return torch.optim.Adagrad(params, lr=self.learning_rate, initial_accumulator_value=0.0)
        return torch.optim.Adam(params, lr=self.learning_rate)

    def _train(
        self,
        train: sp.csr_matrix,
        valid: sp.csr_matrix | None,
        features: sp.csr_matrix | None,
        show_progress: bool,
        callback: Callback | None,
    ) -> None:
        from tqdm.auto import tqdm

        n_users, n_items = train.shape
        warm_start = self.fitted and features is None and self.projector_ is None
        if not warm_start:
            self._build(n_users, n_items, features)
        embedding = self.embedding_
        optimizer = self._optimizer()
        sampler = WarpSampler(
            train,
            batch_size=self.batch_size,
            n_negatives=self.n_negatives,
            seed=self.random_state,
            num_threads=self.num_threads,
        )
        feature_tensor = _torch_sparse(features).to(self.device) if features is not None else None
        eval_users = self._evaluation_users(valid)
        best_recall, best_state, stale, latest_recall = -1.0, None, 0, None
        self.history_, self.best_epoch_ = [], None
        start = time.perf_counter()
        bar = tqdm(total=self.epochs, disable=not show_progress, unit="epoch", desc="CML")
        try:
            for epoch in range(self.epochs):
                last_good = _snapshot(self)
                epoch_loss = 0.0
                for step, batch in enumerate(sampler):
                    users, positives, negatives = (
                        torch.from_numpy(a).to(self.device, non_blocking=True) for a in batch
                    )
                    loss = embedding.warp_loss(
                        users,
                        positives,
                        negatives,
                        self.margin,
                        n_items,
                        self.hardest_only,
                        self.rank_weighted,
                    )
                    if self.lambda_c > 0:
                        if self.covariance_rows == "all":
                            penalty = covariance_loss(embedding.users, embedding.items)
                        else:
                            penalty = covariance_loss(*_batch_rows(embedding, batch))
                        loss = loss + self.lambda_c * penalty
                    if feature_tensor is not None and self.lambda_f > 0:
                        loss = loss + self.lambda_f * feature_loss(self.projector_(feature_tensor), embedding.items)
                    if not torch.isfinite(loss):
                        _restore(self, last_good)
                        raise FloatingPointError(
                            f"the loss became {loss.item()} at epoch {epoch}, step {step}; the model keeps the "
                            f"vectors from the start of this epoch. Lower learning_rate (now {self.learning_rate}) "
                            f"or lambda_c (now {self.lambda_c})"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    embedding.clip_to_ball()
                    epoch_loss += float(loss.detach())
                if not _all_finite(embedding):
                    _restore(self, last_good)
                    raise FloatingPointError(
                        f"the vectors became NaN or infinite during epoch {epoch}; the model keeps the vectors "
                        f"from the start of this epoch. Lower learning_rate (now {self.learning_rate})"
                    )
                metrics: dict[str, float] = {}
                if valid is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs):
                    result = ranking_metrics_at_k(
                        self, train, valid, K=self.eval_k, users=eval_users, num_threads=self.num_threads
                    )
                    metrics = {f"{name}@{self.eval_k}": result[name] for name in ("recall", "precision", "ndcg", "map")}
                    recall = latest_recall = result["recall"]
                    if recall > best_recall:
                        best_recall, best_state, stale = recall, _snapshot(self), 0
                        self.best_epoch_ = epoch
                    else:
                        stale += 1
                elapsed = time.perf_counter() - start
                self.history_.append({"epoch": epoch, "loss": epoch_loss, "elapsed": elapsed, **metrics})
                postfix = {"loss": f"{epoch_loss:.4g}"}
                if latest_recall is not None:
                    postfix[f"val_recall@{self.eval_k}"] = f"{latest_recall:.4f}"
                    postfix["best"] = f"{best_recall:.4f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if callback is not None and callback(epoch, elapsed, epoch_loss, metrics) is False:
                    break
                if valid is not None and stale >= self.patience:
                    break
        finally:
            bar.close()
        if best_state is not None:
            _restore(self, best_state)

    def _evaluation_users(self, valid: sp.csr_matrix | None) -> np.ndarray | None:
        """A fixed sample of users with validation items (all when eval_users is 0)."""
        if valid is None:
            return None
        candidates = np.flatnonzero(np.diff(valid.indptr))
        if self.eval_users == 0 or self.eval_users >= len(candidates):
            return candidates
        rng = np.random.default_rng(self.random_state)
        return np.sort(rng.choice(candidates, self.eval_users, replace=False))

    # ------------------------------------------------------------------ recommendation

    def _index(self, backend: Backend, kind: str) -> Any:
        """The retrieval index over item vectors (kind "items") or user vectors ("users")."""
        if not isinstance(backend, str):
            return backend
        key = (backend, kind)
        if key not in self._indexes:
            vectors = self._vectors(kind).copy()  # the index must not see later training
            # Tune an approximate index on the queries it will serve: user vectors.
            sample = self._vectors("users")[:: max(1, self.n_users // 1000)]
            self._indexes[key] = build_index(backend, vectors, seed=self.random_state, tune_queries=sample)
        return self._indexes[key]

    def recommend(
        self,
        userid: int | Any,
        user_items: Any,
        N: int = 10,
        filter_already_liked_items: bool = True,
        filter_items: Any | None = None,
        items: Any | None = None,
        backend: Backend = "exact",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``N`` items for one user or an array of users.

        Parameters
        ----------
        userid : int or array of int
        user_items : scipy.sparse matrix
            The users' interactions: one row per entry of ``userid`` (as in
            implicit), or the full (n_users, n_items) matrix.
        N : int
        filter_already_liked_items : bool
            Leave out the items in the users' rows of ``user_items``.
        filter_items : array of int, optional
            Item ids never to recommend.
        items : array of int, optional
            Recommend only among these item ids.
        backend : "exact", "lsh", "hnsw", or an index object
            How nearest items are found (see :mod:`cml_rs.retrieval`).

        Returns
        -------
        ids : int64 ndarray, (N,) for one user or (len(userid), N)
        scores : float32 ndarray, negative squared distances (-inf where padded with id -1)
        """
        embedding = self._require_fitted()
        n_users, n_items = embedding.users.shape[0], embedding.items.shape[0]
        users, single = _ids(userid, n_users, "userid")
        N = check_positive_int(N, "N")
        liked = None
        if filter_already_liked_items:
            rows = as_csr(user_items, "user_items")
            if rows.shape[1] != n_items:
                raise ValueError(_shape_hint("user_items", rows.shape, (len(users), n_items)))
            if rows.shape[0] == len(users):
                liked = rows
            elif rows.shape[0] == n_users:
                liked = rows[users]
            else:
                raise ValueError(
                    f"user_items must hold one row per requested user ({len(users)}) or all {n_users} users, "
                    f"got {rows.shape[0]} rows"
                )
        banned = _ids(filter_items, n_items, "filter_items")[0] if filter_items is not None else None
        allowed = _ids(items, n_items, "items")[0] if items is not None else None
        exclude = _exclusions(len(users), n_items, liked, banned)
        ids, sqdist = self._search(self._vectors("users")[users], N, exclude, allowed, backend, "items")
        return (ids[0], -sqdist[0]) if single else (ids, -sqdist)

    def _search(
        self,
        queries: np.ndarray,
        N: int,
        exclude: sp.csr_matrix | None,
        allowed: np.ndarray | None,
        backend: Backend,
        kind: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest item (or user) vectors to ``queries``, skipping ``exclude`` and,
        when ``allowed`` is given, searching only those ids (exactly: such a
        subset is usually small, and an index over all vectors cannot serve it)."""
        if allowed is None:
            return self._index(backend, kind).query(queries, N, exclude=exclude)
        vectors = self._vectors(kind)
        position = np.full(vectors.shape[0], -1, dtype=np.int64)
        position[allowed] = np.arange(len(allowed))
        sub_exclude = None
        if exclude is not None:
            coo = exclude.tocoo()
            keep = position[coo.col] >= 0
            sub_exclude = sp.csr_matrix(
                (coo.data[keep], (coo.row[keep], position[coo.col[keep]])), shape=(len(queries), len(allowed))
            )
        local, sqdist = build_index("exact", vectors[allowed]).query(queries, N, exclude=sub_exclude)
        return np.where(local >= 0, allowed[np.maximum(local, 0)], -1), sqdist

    def similar_items(
        self,
        itemid: int | Any,
        N: int = 10,
        filter_items: Any | None = None,
        items: Any | None = None,
        backend: Backend = "exact",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items nearest to the given item(s) (the item itself first), scores = -squared distance."""
        embedding = self._require_fitted()
        ids, single = _ids(itemid, embedding.items.shape[0], "itemid")
        n_items = embedding.items.shape[0]
        banned = _ids(filter_items, n_items, "filter_items")[0] if filter_items is not None else None
        allowed = _ids(items, n_items, "items")[0] if items is not None else None
        exclude = _exclusions(len(ids), n_items, None, banned)
        found, sqdist = self._search(
            self._vectors("items")[ids], check_positive_int(N, "N"), exclude, allowed, backend, "items"
        )
        return (found[0], -sqdist[0]) if single else (found, -sqdist)

    def similar_users(
        self, userid: int | Any, N: int = 10, backend: Backend = "exact"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Users nearest to the given user(s) (the user itself first), scores = -squared distance."""
        embedding = self._require_fitted()
        ids, single = _ids(userid, embedding.users.shape[0], "userid")
        found, sqdist = self._search(
            self._vectors("users")[ids], check_positive_int(N, "N"), None, None, backend, "users"
        )
        return (found[0], -sqdist[0]) if single else (found, -sqdist)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Writes the model to ``path`` (a versioned .npz, no pickle), atomically."""
        embedding = self._require_fitted()
        arrays = {"user_factors": self.user_factors, "item_factors": self.item_factors}
        if self.projector_ is not None:
            for name, tensor in self.projector_.state_dict().items():
                arrays[f"projector.{name}"] = tensor.detach().cpu().numpy()
        meta = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "cml_rs": __version__,
            "hyperparameters": self.hyperparameters(),
            "n_users": int(embedding.users.shape[0]),
            "n_items": int(embedding.items.shape[0]),
            "n_features": None if self.projector_ is None else int(self.projector_.hidden.in_features),
            "best_epoch": self.best_epoch_,
            "history": self.history_,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        _atomic_savez(Path(path), arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> CollaborativeMetricLearning:
        """Reads a model written by :meth:`save`. A truncated, corrupted or
        newer-version file raises ValueError naming the problem."""
        arrays, meta = _load_checked_npz(Path(path), MODEL_FORMAT, MODEL_VERSION)
        try:
            params = dict(meta["hyperparameters"])
            params["device"] = device
            model = cls(**params)
            users, items = arrays["user_factors"], arrays["item_factors"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: missing or invalid field {error}; the file is damaged") from None
        expected = (int(meta["n_users"]), model.factors), (int(meta["n_items"]), model.factors)
        if (
            users.shape != expected[0]
            or items.shape != expected[1]
            or users.dtype != np.float32
            or items.dtype != np.float32
        ):
            raise ValueError(
                f"{path}: factor arrays {users.shape}/{items.shape} do not match the metadata; the file is damaged"
            )
        if not (np.all(np.isfinite(users)) and np.all(np.isfinite(items))):
            raise ValueError(f"{path}: the stored vectors contain NaN or inf; the file is damaged")
        embedding = CMLEmbedding(1, 1, model.factors, model.max_norm)
        embedding.users = torch.nn.Parameter(torch.from_numpy(users.copy()))
        embedding.items = torch.nn.Parameter(torch.from_numpy(items.copy()))
        model.embedding_ = embedding.to(model.device)
        if meta.get("n_features"):
            projector = FeatureProjector(
                int(meta["n_features"]),
                model.factors,
                model.feature_hidden,
                model.feature_dropout,
                model.max_norm,
            )
            state = {
                name[len("projector.") :]: torch.from_numpy(arr.copy())
                for name, arr in arrays.items()
                if name.startswith("projector.")
            }
            try:
                projector.load_state_dict(state)
            except RuntimeError as error:
                raise ValueError(f"{path}: the feature network does not fit its metadata ({error})") from None
            model.projector_ = projector.to(model.device)
        model.history_ = list(meta.get("history") or [])
        model.best_epoch_ = meta.get("best_epoch")
        return model


CML = CollaborativeMetricLearning

_HYPERPARAMETERS = (
    "factors",
    "margin",
    "n_negatives",
    "learning_rate",
    "optimizer",
    "batch_size",
    "epochs",
    "lambda_c",
    "covariance_rows",
    "rank_weighted",
    "hardest_only",
    "max_norm",
    "lambda_f",
    "feature_hidden",
    "feature_dropout",
    "eval_every",
    "patience",
    "eval_k",
    "eval_users",
    "num_threads",
    "random_state",
)


# ---------------------------------------------------------------------- helpers


def _finite(value: Any, name: str, minimum: float | None = None, strict: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if minimum is not None and (number < minimum or (strict and number == minimum)):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {number}")
    return number


def _shape_hint(name: str, got: tuple[int, int], expected: tuple[int, int]) -> str:
    message = f"{name} has shape {got} but the model expects {expected} (users x items)"
    if tuple(got) == tuple(reversed(expected)) or (got[0] == expected[1] and got[0] != expected[0]):
        message += f"; it looks like an item x user matrix: pass {name}.T.tocsr()"
    elif got[1] != expected[1]:
        message += f"; the number of items differs (dimension 1: {got[1]} vs {expected[1]})"
    else:
        message += f"; the number of users differs (dimension 0: {got[0]} vs {expected[0]})"
    return message


def _ids(values: Any, limit: int, name: str) -> tuple[np.ndarray, bool]:
    """Ids as an int64 array, whether a scalar was given; IndexError when out of range."""
    array = np.asarray(values)
    single = array.ndim == 0
    if array.dtype.kind not in "iu" and array.size:
        raise TypeError(f"{name} must hold integer ids, got dtype {array.dtype}")
    array = np.atleast_1d(array).astype(np.int64).ravel()
    if array.size and (array.min() < 0 or array.max() >= limit):
        bad = array[(array < 0) | (array >= limit)][0]
        raise IndexError(f"{name} {bad} is out of range: ids must be in [0, {limit})")
    return array, single


def _exclusions(
    n_queries: int, n_items: int, liked: sp.csr_matrix | None, banned: np.ndarray | None
) -> sp.csr_matrix | None:
    """One row per query of the item ids to skip: its liked items plus the banned ones."""
    parts = []
    if liked is not None and liked.nnz:
        parts.append(liked.astype(np.float32))
    if banned is not None and len(banned):
        rows = np.repeat(np.arange(n_queries), len(banned))
        parts.append(
            sp.csr_matrix(
                (np.ones(len(rows), np.float32), (rows, np.tile(banned, n_queries))),
                shape=(n_queries, n_items),
            )
        )
    if not parts:
        return None
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return total.tocsr()


def _torch_sparse(features: sp.csr_matrix) -> torch.Tensor:
    coo = features.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True).coalesce()


def _batch_rows(embedding: CMLEmbedding, batch: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct user and item vectors a batch touches."""
    users, positives, negatives = batch
    device = embedding.users.device
    item_ids = torch.from_numpy(np.unique(np.concatenate([positives, negatives.ravel()]))).to(device)
    user_ids = torch.from_numpy(np.unique(users)).to(device)
    return embedding.user_rows(user_ids), embedding.item_rows(item_ids)


def _snapshot(model: CollaborativeMetricLearning) -> list[dict[str, torch.Tensor]]:
    parts = [model.embedding_.state_dict()]
    if model.projector_ is not None:
        parts.append(model.projector_.state_dict())
    return [{k: v.detach().clone() for k, v in part.items()} for part in parts]


def _restore(model: CollaborativeMetricLearning, snapshot: list[dict[str, torch.Tensor]]) -> None:
    model.embedding_.load_state_dict(snapshot[0])
    if model.projector_ is not None and len(snapshot) > 1:
        model.projector_.load_state_dict(snapshot[1])


def _all_finite(embedding: CMLEmbedding) -> bool:
    return bool(torch.isfinite(embedding.users).all() and torch.isfinite(embedding.items).all())


@contextlib.contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    """Caps torch's intra-op threads for the duration (0: all cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
