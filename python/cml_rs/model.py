"""Collaborative Metric Learning as a recommender with an implicit-style API.

    from cml_rs import CML
    model = CML()                               # tuned defaults, see the class
    model.fit(train, validation=valid)          # early stopping on validation recall
    ids, scores = model.recommend(user, train[user], N=10)

The estimator holds the hyper-parameters (declared in :mod:`cml_rs._params`)
and the learned state; the loop that learns it is :mod:`cml_rs.training`,
the nearest-neighbour search :mod:`cml_rs.retrieval` and the file format
:mod:`cml_rs._io`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from . import __version__
from ._checks import as_csr, as_ids, check_ids_below, check_int, require_csr
from ._io import NpzReader, PathOrFile, meta_int, open_npz, save_npz
from ._params import HYPERPARAMETERS, check_hyperparameters
from .features import FeatureLayout, prepare
from .nn import CMLEmbedding, FeatureProjector
from .retrieval import Backend, build_index, top_n
from .training import Callback, Trainer, fold_in, resolve_negatives, torch_threads

__all__ = ["CML", "CollaborativeMetricLearning"]

MODEL_FORMAT = "cml-rs-model"
MODEL_VERSION = 1


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
    n_negatives : int or None
        Negatives U sampled per positive pair (paper: 20). None (the default):
        0.2 / density of the training matrix, within [3, 20] (within [3, 40]
        where the items have 10 or more interactions each on average), so that
        the hardest of U is rarely a liked item the user has not met; the
        number used is ``n_negatives_`` after the fit (see Notes).
    adaptive_margin : float
        0 (the paper): one margin for everyone. Above 0, each user learns its
        own margin m_u (starting at ``margin``, kept in [0, 4 max_norm^2]) and
        the loss subtracts this weight times m_u per pair, as in SML (Li et
        al., AAAI 2020): a margin widens until the weighted share of the
        user's pairs with an active hinge reaches the weight. Margins shape
        training only; ranking, fold-in and saved models use distances alone.
    negative_popularity : float
        Draw the negatives in proportion to (popularity + 1)^this instead of
        uniformly (0, the paper): with the hardest of U kept, Tran et al.'s
        two-stage sampling (SIGIR 2019).
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
    covariance_rows : {"sampled", "all", "batch"}
        Rows the covariance regulariser is taken over each step:
        ``covariance_sample`` rows drawn uniformly from all users and items
        (default), all of them (the paper), or the rows the batch moves (its
        users, positives and chosen negatives). With "all" every step costs
        O((n_users + n_items) r^2) and touches every row, so the cost of an
        epoch grows with the catalogue instead of the data; the sample
        estimates the same penalty from a fixed number of rows. Measured with
        the defaults otherwise (benches/steps.py): test recall@50 0.3053 vs
        0.3054 with "all" on citeulike-t (paired p 0.96) and 0.4091 vs 0.4102
        on ml-1m-implicit, at a fraction of the step cost (benches/RESULTS.md).
    covariance_sample : int
        Rows drawn per step with ``covariance_rows="sampled"``.
    binary : bool
        Treat every stored entry of ``user_items`` as a plain positive. By
        default the values are confidence weights (play counts, ratings, BM25):
        an epoch draws positive pairs in proportion to ``log(1 + value)``, so a
        pair with 0 is never drawn and a binary matrix trains as before.
    rank_weighted : bool
        Multiply each pair's hinge by the WARP weight log(rank + 1).
    hardest_only : bool
        Only the hardest negative counts (paper); otherwise every impostor, weighted by w / M.
    max_norm : float
        Radius of the ball the vectors are kept in (paper: 1).
    lambda_f, feature_hidden, feature_dropout :
        CML+F: weight of the feature loss, hidden width and dropout of the MLP f
        (paper: 1, 256, 0.5, kept). Used when ``fit`` gets ``item_features``.
        Searched on citeulike-t's validation split (benches/hybrid.py
        feature-defaults): lambda_f 1 beat 0.3 and 3; no width (128-512) or
        dropout (0.08-0.8) gained more than 1%, within one split's noise.
    lambda_g :
        Weight of the user-feature loss: the network g pulls each user's vector
        towards g(y_i), as f does for items. Used when ``fit`` gets ``user_features``.
    feature_tie_below : int
        After fitting, items with fewer than this many training interactions
        take their vector from the feature network, v_j = f(x_j), instead of
        their own poorly estimated one (0: never, the default: on citeulike-t's
        validation split a tie at 2 or 5 cost 5% and 15% of recall@50).
    fold_in_epochs : int
        Passes over a row's interactions when it is folded in
        (``recalculate_user``, ``recalculate_item``, ``partial_fit_users``,
        ``partial_fit_items``): only that row is optimised.
    eval_every : int
        Epochs between checks for early stopping.
    patience : int
        Checks without progress before training stops: with validation data,
        no better validation recall; without, a training loss that did not fall
        by ``tolerance``.
    tolerance : float
        Without validation data, the relative fall of the epoch's training loss
        (against its best so far) that counts as progress.
    eval_k : int
        Recall cut-off used for model selection.
    eval_users : int
        Size of the fixed random sample of validation users that model
        selection ranks (0: all). The default, 30,000, is all of them on every
        panel data set and keeps a check O(30,000 x items) at a million users,
        where recall@50 is still measured to about 0.002.
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
    Defaults are the paper's (r = 100, unit ball, hardest-negative WARP loss
    with rank weights, lambda_c = 10, AdaGrad at 0.1) except U and the margin.
    U follows the data's density. On the validation splits of the four real
    panel sets, U = 10 beat 20 by 13% on ml-100k (2.1% dense), ml-1m-implicit
    (1.6%) lost recall below 10, and ml-latest-small (0.5%) and citeulike-t
    (0.04%) did best at 20: 0.2 / density gives 9, 12, 20 and 20. On
    synthetic-dense, left out of the choice, it gives 10, which beats 20 by 3.6%
    (benches/RESULTS.md). Above 20, U = 40 lost on the two sparse sets whose
    items have about 3 interactions each and won on two synthetic sets with 25
    and 59, so U may rise to 40 from 10 an item; Gowalla (17.5), the check,
    gains 10.6% on validation at 40. The margin was
    tuned on citeulike-t's validation split (benches/RESULTS.md), margin 0.5
    plateaus near recall@50 0.18, 1.0 near 0.27, and 1.5 near 0.29-0.30; 2.0
    and 2.5 are no better. Batches of 2,048 pairs train about as well per epoch
    as larger ones and converge sooner in wall time; lambda_c between 1 and 30
    changes little; on citeulike-t so does U between 10 and 20, and U = 50
    lowers recall.
    """

    #: Scores are minus squared Euclidean distances (evaluation ranks by distance).
    metric_space = "euclidean"

    def __init__(
        self,
        factors: int = 100,
        margin: float = 1.5,
        n_negatives: int | None = None,
        adaptive_margin: float = 0.0,
        negative_popularity: float = 0.0,
        learning_rate: float = 0.1,
        optimizer: str = "adagrad",
        batch_size: int = 2048,
        epochs: int = 200,
        lambda_c: float = 10.0,
        covariance_rows: str = "sampled",
        covariance_sample: int = 4096,
        binary: bool = False,
        rank_weighted: bool = True,
        hardest_only: bool = True,
        max_norm: float = 1.0,
        lambda_f: float = 1.0,
        lambda_g: float = 1.0,
        feature_hidden: int = 256,
        feature_dropout: float = 0.5,
        feature_tie_below: int = 0,
        fold_in_epochs: int = 20,
        eval_every: int = 2,
        patience: int = 5,
        tolerance: float = 0.01,
        eval_k: int = 50,
        eval_users: int = 30_000,
        device: str | torch.device = "cpu",
        num_threads: int = 0,
        random_state: int = 0,
    ) -> None:
        given = {name: value for name, value in locals().items() if name not in ("self", "device", "__class__")}
        for name, value in check_hyperparameters(given).items():
            setattr(self, name, value)
        self.device = torch.device(device)
        self.embedding_: CMLEmbedding | None = None
        self.item_network_: FeatureProjector | None = None
        self.user_network_: FeatureProjector | None = None
        self.item_feature_layout_: FeatureLayout | None = None
        self.user_feature_layout_: FeatureLayout | None = None
        self.history_: list[dict[str, Any]] = []
        self.best_epoch_: int | None = None
        self.n_negatives_: int | None = None  # the U of the last fit (n_negatives, or by density)
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
        params = {p.name: getattr(self, p.name) for p in HYPERPARAMETERS}
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
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        user_features: Any | None = None,
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
            metrics of that epoch, if any. A callback that takes fewer arguments
            (implicit's ``callback(iteration, elapsed, loss)``) gets the first ones.
        validation : scipy.sparse matrix (n_users, n_items), optional
            Held-out interactions: every ``eval_every`` epochs, recall@``eval_k``
            on a fixed sample of users picks the best weights, and training stops
            after ``patience`` evaluations without improvement. Without it,
            training stops once the training loss stops falling (see ``tolerance``);
            the progress bar says which rule applies.
        item_features : scipy.sparse matrix (n_items, n_features) or dict of them, optional
            Item side information for CML+F (one matrix, or named blocks such as
            ``{"tags": ..., "words": ...}``, each normalised on its own; see
            :mod:`cml_rs.features`). Per step the network f runs on the batch's
            items only.
        user_features : scipy.sparse matrix (n_users, n_features) or dict of them, optional
            User side information: a second network g pulls each user towards g(y_i).
        checkpoint : path, optional
            Where the fit's whole state is written, atomically, every
            ``checkpoint_every`` epochs and at the end. If the file exists (a
            fit of the same data and settings was interrupted, even by kill -9),
            the fit resumes from it and ends bit for bit where an uninterrupted
            fit with the same seed and thread count would; a finished one
            returns at once. A checkpoint of other data or settings is refused.
        checkpoint_every : int
            Epochs between checkpoints.

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
        if train.nnz and train.data.min() < 0:
            raise ValueError(
                f"user_items holds negative values (as low as {train.data.min()}); implicit feedback and "
                f"confidence weights are >= 0 (drop or zero the negative entries)"
            )
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
        items_x = users_y = None
        if item_features is not None:
            items_x, self.item_feature_layout_ = prepare(item_features, n_items, "item_features")
        if user_features is not None:
            users_y, self.user_feature_layout_ = prepare(user_features, n_users, "user_features")
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every")

        with torch_threads(self.num_threads):
            warm_start = self.fitted and items_x is None and users_y is None and self.item_network_ is None
            if not warm_start:
                self._build(n_users, n_items, items_x, users_y)
            resolve_negatives(self, train)
            trainer = Trainer(self, train, valid, items_x, users_y)
            trainer.run(show_progress, callback, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
            if items_x is not None and self.feature_tie_below > 0:
                self._tie_rare_items(train, items_x)
        self._indexes.clear()
        return self

    def _build(self, n_users: int, n_items: int, items_x: sp.csr_matrix | None, users_y: sp.csr_matrix | None) -> None:
        """Fresh vectors: N(0, 1/sqrt(r)) rows clipped to the ball; with features, a feature
        network per side and the vectors starting at its output (the paper's CML+F start)."""
        generator = torch.Generator().manual_seed(self.random_state)
        embedding = CMLEmbedding(n_users, n_items, self.factors, self.max_norm, generator=generator)
        torch.manual_seed(self.random_state)
        self.item_network_ = self._network(items_x, embedding.items)
        self.user_network_ = self._network(users_y, embedding.users)
        if items_x is None:
            self.item_feature_layout_ = None
        if users_y is None:
            self.user_feature_layout_ = None
        self.embedding_ = embedding.to(self.device)

    def _network(self, features: sp.csr_matrix | None, vectors: torch.Tensor) -> FeatureProjector | None:
        """A feature network for ``features``, with ``vectors`` set to its (eval-mode) output."""
        if features is None:
            return None
        network = FeatureProjector(
            features.shape[1], self.factors, self.feature_hidden, self.feature_dropout, self.max_norm
        )
        network.eval()
        with torch.no_grad():
            for start in range(0, features.shape[0], 65536):
                block = features[start : start + 65536]
                vectors[start : start + block.shape[0]] = network(block)
        network.train()
        return network.to(self.device)

    def _tie_rare_items(self, train: sp.csr_matrix, items_x: sp.csr_matrix) -> None:
        """Items seen fewer than ``feature_tie_below`` times take v_j = f(x_j)."""
        counts = np.asarray((train > 0).sum(axis=0)).ravel()
        rare = np.flatnonzero(counts < self.feature_tie_below)
        if len(rare):
            vectors = torch.from_numpy(self._project(self.item_network_, items_x[rare])).to(self.device)
            with torch.no_grad():
                self.embedding_.items[torch.from_numpy(rare).to(self.device)] = vectors

    # ------------------------------------------------------------------ cold start

    def _project(self, network: FeatureProjector, features: sp.csr_matrix) -> np.ndarray:
        """The network's output (eval mode: no dropout) for prepared ``features``."""
        network.eval()
        try:
            with torch.no_grad(), torch_threads(self.num_threads):
                return network(features).cpu().numpy()
        finally:
            network.train()

    def item_vectors_from_features(self, item_features: Any) -> np.ndarray:
        """Vectors for items described only by their features (cold start): f(x), in the
        ball, comparable with the trained items. ``item_features`` has the blocks
        (names and widths) the model was trained with; the model is not changed."""
        if self.item_network_ is None or self.item_feature_layout_ is None:
            raise ValueError("this model was fitted without item_features; it has no network to map features")
        n = _feature_rows(item_features, "item_features")
        features, _ = prepare(item_features, n, "item_features", self.item_feature_layout_)
        return self._project(self.item_network_, features)

    def user_vectors_from_features(self, user_features: Any) -> np.ndarray:
        """Vectors for users described only by their features: g(y) (see :meth:`item_vectors_from_features`)."""
        if self.user_network_ is None or self.user_feature_layout_ is None:
            raise ValueError("this model was fitted without user_features; it has no network to map features")
        n = _feature_rows(user_features, "user_features")
        features, _ = prepare(user_features, n, "user_features", self.user_feature_layout_)
        return self._project(self.user_network_, features)

    def add_items(self, item_features: Any) -> np.ndarray:
        """Adds items known only by their features (vectors f(x)); returns their new ids, which
        recommend, similar_items and partial_fit_items then accept like any others."""
        return self._grow("items", self.item_vectors_from_features(item_features))

    def add_users(self, user_features: Any) -> np.ndarray:
        """Adds users known only by their features (vectors g(y)); returns their new ids."""
        return self._grow("users", self.user_vectors_from_features(user_features))

    def _grow(self, side: str, vectors: np.ndarray) -> np.ndarray:
        embedding = self._require_fitted()
        table = embedding.users if side == "users" else embedding.items
        first = table.shape[0]
        grown = torch.nn.Parameter(torch.cat([table.detach(), torch.from_numpy(vectors).to(self.device)]))
        if side == "users":
            embedding.users = grown
        else:
            embedding.items = grown
        self._indexes.clear()
        return np.arange(first, first + len(vectors), dtype=np.int32)

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

    def _top_n(
        self,
        queries: np.ndarray,
        N: int,
        liked: sp.csr_matrix | None,
        banned: np.ndarray | None,
        allowed: np.ndarray | None,
        backend: Backend,
        kind: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest item (or user) vectors to ``queries`` as the public API returns them: int32 ids."""
        ids, scores = top_n(
            self._index(backend, kind),
            self._vectors(kind),
            queries,
            N,
            liked=liked,
            banned=banned,
            allowed=allowed,
            num_threads=self.num_threads,
        )
        return ids.astype(np.int32), scores

    def recommend(
        self,
        userid: int | Any,
        user_items: Any,
        N: int = 10,
        filter_already_liked_items: bool = True,
        filter_items: Any | None = None,
        recalculate_user: bool = False,
        items: Any | None = None,
        backend: Backend = "exact",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``N`` items nearest to one user or to each of an array of users (implicit's API).

        Parameters
        ----------
        userid : int or array of int
        user_items : scipy.sparse.csr_matrix
            One row per entry of ``userid``: the users' interactions, e.g.
            ``train[userid]``. Needed to filter liked items and to recalculate.
        N : int
            Items per user.
        filter_already_liked_items : bool
            Rank the users' liked items last instead of among the others.
        filter_items : array of int, optional
            Item ids never to recommend.
        recalculate_user : bool
            Compute the users' vectors from ``user_items`` (fold-in, the
            rest of the model frozen) instead of using the stored ones; the
            model is not changed. Works for users the model has never seen.
        items : array of int, optional
            Rank only these item ids (not together with ``filter_items``).
        backend : "exact", "lsh", "hnsw", or an index object
            How nearest items are found (see :mod:`cml_rs.retrieval`).

        Returns
        -------
        ids : int32 ndarray, (n,) for one user or (len(userid), n)
        scores : float32 ndarray, minus the squared distance (always <= 0), best first

        Notes
        -----
        ``n = min(N, number of candidates)``, the candidates being ``items`` (or
        every item) minus ``filter_items``: no row is ever padded. A user's
        liked items come after every other candidate, nearest first, with the
        lowest float32 score (as implicit ranks them), and only when fewer
        than ``n`` other candidates remain.
        """
        self._require_fitted()
        users, single = as_ids(userid, "userid")
        if not recalculate_user:
            check_ids_below(users, self.n_users, "userid")
        N = check_int(N, "N")
        rows = None
        if filter_already_liked_items or recalculate_user:
            rows = self._rows_of("user_items", user_items, len(users), self.n_items, "userid", "user_items[userid]")
        if items is not None and filter_items is not None:
            raise ValueError("pass either items (rank only these) or filter_items (never recommend these), not both")
        banned = _ids(filter_items, self.n_items, "filter_items")[0] if filter_items is not None else None
        allowed = _ids(items, self.n_items, "items")[0] if items is not None else None
        if recalculate_user:
            queries = self._fold_in(rows, "users")
        else:
            queries = self._vectors("users")[users]
        liked = rows if filter_already_liked_items else None
        ids, scores = self._top_n(queries, N, liked, banned, allowed, backend, "items")
        return (ids[0], scores[0]) if single else (ids, scores)

    def similar_items(
        self,
        itemid: int | Any,
        N: int = 10,
        recalculate_item: bool = False,
        item_users: Any | None = None,
        filter_items: Any | None = None,
        items: Any | None = None,
        backend: Backend = "exact",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``N`` items nearest to each given item, the item itself first (implicit's API).

        With ``recalculate_item``, the items' vectors are computed from
        ``item_users`` (one row of users per item) with the rest of the model
        frozen. ``filter_items`` / ``items`` exclude or restrict the results as
        in :meth:`recommend`; scores are minus squared distances (<= 0).
        """
        self._require_fitted()
        ids, single = as_ids(itemid, "itemid")
        N = check_int(N, "N")
        if items is not None and filter_items is not None:
            raise ValueError("pass either items (rank only these) or filter_items (never return these), not both")
        if recalculate_item:
            rows = self._rows_of("item_users", item_users, len(ids), self.n_users, "itemid", "item_users[itemid]")
            queries = self._fold_in(rows, "items")
        else:
            queries = self._vectors("items")[check_ids_below(ids, self.n_items, "itemid")]
        banned = _ids(filter_items, self.n_items, "filter_items")[0] if filter_items is not None else None
        allowed = _ids(items, self.n_items, "items")[0] if items is not None else None
        found, scores = self._top_n(queries, N, None, banned, allowed, backend, "items")
        if not recalculate_item:
            _self_first(found, scores, ids, banned, allowed)
        return (found[0], scores[0]) if single else (found, scores)

    def similar_users(
        self,
        userid: int | Any,
        N: int = 10,
        filter_users: Any | None = None,
        users: Any | None = None,
        backend: Backend = "exact",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``N`` users nearest to each given user, the user itself first (implicit's API).

        ``filter_users`` are never returned; with ``users``, only those are
        ranked. Scores are minus squared distances (<= 0).
        """
        self._require_fitted()
        ids, single = _ids(userid, self.n_users, "userid")
        N = check_int(N, "N")
        if users is not None and filter_users is not None:
            raise ValueError("pass either users (rank only these) or filter_users (never return these), not both")
        banned = _ids(filter_users, self.n_users, "filter_users")[0] if filter_users is not None else None
        allowed = _ids(users, self.n_users, "users")[0] if users is not None else None
        found, scores = self._top_n(self._vectors("users")[ids], N, None, banned, allowed, backend, "users")
        _self_first(found, scores, ids, banned, allowed)
        return (found[0], scores[0]) if single else (found, scores)

    def _rows_of(self, name: str, matrix: Any, n_rows: int, n_cols: int, ids_name: str, example: str) -> sp.csr_matrix:
        """``matrix`` when it is CSR with one row per requested id and ``n_cols`` columns."""
        rows = require_csr(matrix, name)
        if rows.shape[0] != n_rows:
            raise ValueError(
                f"{name} must hold one row per entry of {ids_name} ({n_rows}), got {rows.shape[0]} rows; pass {example}"
            )
        if rows.shape[1] != n_cols:
            raise ValueError(f"{name} must have {n_cols} columns (the model's), got shape {rows.shape}")
        if rows.nnz and not np.all(np.isfinite(rows.data)):
            raise ValueError(f"{name} holds NaN or infinite values")
        return rows

    def _fold_in(self, rows: sp.csr_matrix, side: str, start: torch.Tensor | None = None) -> np.ndarray:
        """Vectors learned for ``rows`` with the model frozen (see :func:`cml_rs.training.fold_in`)."""
        with torch_threads(self.num_threads):
            return fold_in(self, rows, side, start=start).cpu().numpy()

    # ------------------------------------------------------------------ fold-in

    def partial_fit_users(self, userids: Any, user_items: Any, user_features: Any | None = None) -> None:
        """Learns the vectors of ``userids`` from ``user_items`` (one row per id), everything else frozen.

        Ids of known users replace their vectors; ids ``n_users, n_users + 1, ...``
        add users (implicit's semantics), and must follow on from the current
        users without gaps. Costs seconds, not a refit: only these rows are
        optimised. With ``user_features`` (a model fitted with them), each row
        starts from g(y) instead of the centroid of its items.
        """
        start = None if user_features is None else torch.from_numpy(self.user_vectors_from_features(user_features))
        self._partial_fit(userids, user_items, "users", start)

    def partial_fit_items(self, itemids: Any, item_users: Any, item_features: Any | None = None) -> None:
        """Learns the vectors of ``itemids`` from ``item_users`` (one row of users per id), everything
        else frozen; new ids ``n_items, n_items + 1, ...`` add items (see :meth:`partial_fit_users`);
        with ``item_features``, each row starts from f(x)."""
        start = None if item_features is None else torch.from_numpy(self.item_vectors_from_features(item_features))
        self._partial_fit(itemids, item_users, "items", start)

    def _partial_fit(self, ids: Any, interactions: Any, side: str, start: torch.Tensor | None = None) -> None:
        embedding = self._require_fitted()
        name, other = ("userids", "user_items") if side == "users" else ("itemids", "item_users")
        ids, _ = as_ids(ids, name)
        size = self.n_users if side == "users" else self.n_items
        n_cols = self.n_items if side == "users" else self.n_users
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{name} holds an id more than once")
        if ids.size and ids.min() < 0:
            raise IndexError(f"{name} {ids.min()} is negative; ids are 0, 1, 2, ...")
        new = np.sort(ids[ids >= size])
        if len(new) and not np.array_equal(new, np.arange(size, size + len(new))):
            missing = np.setdiff1d(np.arange(size, new.max() + 1), new)[0]
            raise IndexError(
                f"{name} skips ahead: the model has {size} {side}, so new ids must be {size}, {size + 1}, ... "
                f"without gaps, but {missing} is missing"
            )
        rows = self._rows_of(other, interactions, len(ids), n_cols, name, f"{other}[{name}]")
        if start is not None and len(start) != len(ids):
            raise ValueError(f"the features describe {len(start)} rows but {name} has {len(ids)} ids")
        vectors = torch.from_numpy(self._fold_in(rows, side, start)).to(self.device)
        table = embedding.users if side == "users" else embedding.items
        with torch.no_grad():
            grown = torch.cat([table.detach(), table.new_zeros((len(new), table.shape[1]))])
            grown[torch.from_numpy(ids).to(self.device)] = vectors
        if side == "users":
            embedding.users = torch.nn.Parameter(grown)
        else:
            embedding.items = torch.nn.Parameter(grown)
        self._indexes.clear()

    # ------------------------------------------------------------------ persistence

    def save(self, file: PathOrFile) -> None:
        """Writes the model (a versioned .npz, no pickle) to a path, atomically, or to an open
        binary file. A path without suffix gets ``.npz``; an unfitted model saves its settings."""
        arrays: dict[str, np.ndarray] = {}
        if self.fitted:
            arrays = {"user_factors": self.user_factors, "item_factors": self.item_factors}
        for prefix, network in (("projector", self.item_network_), ("user_projector", self.user_network_)):
            if network is not None:
                for name, tensor in network.state_dict().items():
                    arrays[f"{prefix}.{name}"] = tensor.detach().cpu().numpy()
        meta = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "cml_rs": __version__,
            "hyperparameters": self.hyperparameters(),
            "fitted": self.fitted,
            "n_users": self.n_users if self.fitted else None,
            "n_items": self.n_items if self.fitted else None,
            "n_features": None if self.item_network_ is None else int(self.item_network_.hidden.in_features),
            "n_user_features": None if self.user_network_ is None else int(self.user_network_.hidden.in_features),
            "item_feature_layout": None if self.item_feature_layout_ is None else self.item_feature_layout_.to_json(),
            "user_feature_layout": None if self.user_feature_layout_ is None else self.user_feature_layout_.to_json(),
            "best_epoch": self.best_epoch_,
            "n_negatives": self.n_negatives_,
            "history": self.history_,
        }
        save_npz(file, arrays, meta)

    @classmethod
    def load(cls, file: PathOrFile, device: str | torch.device = "cpu") -> CollaborativeMetricLearning:
        """Reads a model written by :meth:`save` from a path (``.npz`` is added when the
        name has none and the file without it does not exist) or an open binary file.

        Nothing in the file is trusted: its metadata must be well formed, only the
        members the format defines are read, each only after its shape was checked
        against the metadata, and the vectors must lie in the ball the model keeps
        them in. A truncated, corrupted, impossible or newer-version file raises
        ValueError naming the problem.
        """
        with open_npz(file, MODEL_FORMAT, MODEL_VERSION) as reader:
            meta, source = reader.meta, reader.name
            params = meta.get("hyperparameters")
            if not isinstance(params, dict):
                raise ValueError(f"{source}: its hyper-parameters are missing; the file is damaged")
            try:
                model = cls(**{**params, "device": device})
            except (TypeError, ValueError) as error:
                raise ValueError(f"{source}: its hyper-parameters are invalid ({error}); the file is damaged") from None
            history, best_epoch = meta.get("history") or [], meta_int(meta, "best_epoch", source, optional=True)
            if not isinstance(history, list):
                raise ValueError(f"{source}: its history is not a list; the file is damaged")
            model.history_, model.best_epoch_ = history, best_epoch
            if meta.get("fitted", True) is False:
                return model
            # The U the fit used (files before the density rule hold it only as a setting).
            model.n_negatives_ = meta_int(meta, "n_negatives", source, minimum=1, optional=True) or model.n_negatives
            n_users, n_items = meta_int(meta, "n_users", source), meta_int(meta, "n_items", source)
            users = reader.array("user_factors", (n_users, model.factors), np.float32)
            items = reader.array("item_factors", (n_items, model.factors), np.float32)
            for kind, vectors in (("user", users), ("item", items)):
                if not np.all(np.isfinite(vectors)):
                    raise ValueError(f"{source}: the stored {kind} vectors contain NaN or inf; the file is damaged")
                largest = float(np.sqrt((vectors.astype(np.float64) ** 2).sum(axis=1).max(initial=0.0)))
                if largest > model.max_norm * (1 + 1e-4):
                    raise ValueError(
                        f"{source}: a stored {kind} vector has norm {largest:.4g}, outside the ball of radius "
                        f"{model.max_norm} the model keeps them in; the file is damaged"
                    )
            embedding = CMLEmbedding.from_vectors(torch.from_numpy(users), torch.from_numpy(items), model.max_norm)
            model.embedding_ = embedding.to(model.device)
            for side, prefix, count in (
                ("item", "projector", "n_features"),
                ("user", "user_projector", "n_user_features"),
            ):
                n_features = meta_int(meta, count, source, minimum=1, optional=True)
                if n_features is None:
                    continue
                network = _load_projector(reader, model, n_features, prefix).to(model.device)
                stored_layout = meta.get(f"{side}_feature_layout")
                try:
                    layout = (
                        FeatureLayout.from_json(stored_layout)
                        if stored_layout is not None
                        else FeatureLayout([("features", n_features)])
                    )
                except ValueError as error:
                    raise ValueError(f"{source}: {error}; the file is damaged") from None
                if layout.width != n_features:
                    raise ValueError(f"{source}: the {side} feature layout does not add up to {n_features} features")
                setattr(model, f"{side}_network_", network)
                setattr(model, f"{side}_feature_layout_", layout)
        return model


CML = CollaborativeMetricLearning


# ---------------------------------------------------------------------- helpers


def _feature_rows(features: Any, name: str) -> int:
    """Rows of a feature matrix or of the first block of a dict of them."""
    first = next(iter(features.values()), None) if isinstance(features, dict) else features
    if first is None or not hasattr(first, "shape") or len(first.shape) != 2:
        raise TypeError(f"{name} must be a scipy.sparse matrix or a dict of them")
    return int(first.shape[0])


def _load_projector(
    reader: NpzReader, model: CollaborativeMetricLearning, n_features: int, prefix: str
) -> FeatureProjector:
    """A feature network of a saved model, its arrays checked before it is built."""
    hidden, dim = model.feature_hidden, model.factors
    shapes = {
        "hidden.weight": (hidden, n_features),
        "hidden.bias": (hidden,),
        "output.weight": (dim, hidden),
        "output.bias": (dim,),
    }
    state = {
        name: torch.from_numpy(reader.array(f"{prefix}.{name}", shape, np.float32)) for name, shape in shapes.items()
    }
    projector = FeatureProjector(n_features, dim, hidden, model.feature_dropout, model.max_norm)
    projector.load_state_dict(state)
    return projector


def _shape_hint(name: str, got: tuple[int, int], expected: tuple[int, int]) -> str:
    message = f"{name} has shape {got} but the model expects {expected} (users x items)"
    if tuple(got) == tuple(reversed(expected)) or (got[0] == expected[1] and got[0] != expected[0]):
        message += f"; it looks like an item x user matrix: pass {name}.T.tocsr()"
    elif got[1] != expected[1]:
        message += f"; the number of items differs (dimension 1: {got[1]} vs {expected[1]})"
    else:
        message += f"; the number of users differs (dimension 0: {got[0]} vs {expected[0]})"
    return message


def _self_first(
    found: np.ndarray, scores: np.ndarray, ids: np.ndarray, banned: np.ndarray | None, allowed: np.ndarray | None
) -> None:
    """Puts each query's own id first in its row (in place), as similar_* promise: another
    vector at distance 0 may tie with it, and an approximate index may miss it."""
    for row, own in enumerate(ids):
        if (banned is not None and own in banned) or (allowed is not None and own not in allowed) or not found.shape[1]:
            continue
        at = np.flatnonzero(found[row] == own)
        keep = np.delete(np.arange(found.shape[1]), at[0] if len(at) else found.shape[1] - 1)
        found[row] = np.concatenate([[own], found[row, keep]])
        scores[row] = np.concatenate([[0.0], scores[row, keep]])


def _ids(values: Any, limit: int, name: str) -> tuple[np.ndarray, bool]:
    """Ids as an int64 array in [0, limit), and whether a scalar was given."""
    ids, single = as_ids(values, name)
    return check_ids_below(ids, limit, name), single
