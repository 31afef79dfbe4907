"""Baselines to measure CML against, with implicit's ``fit`` / ``recommend`` API.

No dependency beyond numpy and scipy, so ``cml-rs compare DATA`` can rank
them next to CML on a user's own data:

- :class:`Popularity`: every user gets the most popular items they have not seen.
- :class:`EASE` (Steck, WWW 2019): a closed-form item-item model,
  ``B = I - P / diag(P)`` with ``P = (X^T X + lambda I)^-1``; scores ``X B``.
  Dense in the number of items (4 n_items^2 bytes, O(n_items^3) time); with
  ``device="cuda"`` torch does the inverse and the scoring on the GPU.
- :class:`RP3beta` (Paudel et al., 2017): item-item random-walk probabilities
  ``P_iu^alpha P_ui^alpha``, divided by the target item's popularity^beta,
  keeping each item's ``top_k`` neighbours; scores ``X W``.

Scores are "higher is better" (they are not distances). Each model ranks the
items of the users it is asked about block by block, so memory stays
O(block x n_items).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from ._checks import as_csr, as_ids, check_float, check_ids_below, check_int, require_csr

__all__ = ["EASE", "Popularity", "RP3beta", "ScoringRecommender"]

#: Users scored at once (scores are a dense users x items block).
BLOCK = 1024
#: EASE's largest regularisation: its weights scale like 1/lambda^2, and float32
#: holds them without underflow up to about 1e19.
MAX_REGULARIZATION = 1e12


class ScoringRecommender:
    """What the baselines share: fit stores the training matrix, ``recommend``
    ranks dense score blocks with the already-liked items pushed last."""

    def __init__(self) -> None:
        self.n_users: int | None = None
        self.n_items: int | None = None

    def _fit_matrix(self, user_items: Any) -> sp.csr_matrix:
        matrix = sp.csr_matrix(as_csr(user_items, "user_items"), dtype=np.float32)
        if matrix.nnz == 0:
            raise ValueError(f"user_items {matrix.shape} holds no interactions; there is nothing to learn from")
        if not np.all(np.isfinite(matrix.data)) or matrix.data.min() < 0:
            raise ValueError("user_items must hold finite, non-negative values")
        matrix.data[:] = 1.0
        self.n_users, self.n_items = matrix.shape
        return matrix

    def scores(self, userids: np.ndarray, user_rows: sp.csr_matrix) -> np.ndarray:
        """Dense (len(userids), n_items) scores of users, given their ids and interaction rows: a
        fresh array (or a torch tensor on the model's device), which ``recommend`` writes into."""
        raise NotImplementedError

    def fit(self, user_items: Any, show_progress: bool = False) -> ScoringRecommender:
        raise NotImplementedError

    def recommend(
        self,
        userid: Any,
        user_items: Any,
        N: int = 10,
        filter_already_liked_items: bool = True,
        filter_items: Any | None = None,
        items: Any | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``N`` items (int32 ids, float32 scores) of the users whose rows ``user_items`` holds.

        ``user_items`` has one CSR row per entry of ``userid``; those rows are
        what the user is scored from, and (by default) are ranked last.
        """
        if self.n_items is None:
            raise RuntimeError("the model is not fitted yet; call fit(user_items) first")
        users, single = as_ids(userid, "userid")
        rows = require_csr(user_items, "user_items")
        if rows.shape != (len(users), self.n_items):
            raise ValueError(
                f"user_items must hold one row per entry of userid ({len(users)}) and {self.n_items} columns, "
                f"got shape {rows.shape}; pass user_items[userid]"
            )
        N = check_int(N, "N")
        candidates = (
            np.unique(check_ids_below(as_ids(items, "items")[0], self.n_items, "items"))
            if items is not None
            else np.arange(self.n_items)
        )
        if filter_items is not None:
            banned = check_ids_below(as_ids(filter_items, "filter_items")[0], self.n_items, "filter_items")
            candidates = np.setdiff1d(candidates, banned)
        width = min(N, len(candidates))
        ids = np.zeros((len(users), width), np.int32)
        scores = np.zeros((len(users), width), np.float32)
        every_item = len(candidates) == self.n_items  # then candidates is arange(n_items)
        for start in range(0, len(users), BLOCK):
            block = rows[start : start + BLOCK]
            block_scores = self.scores(users[start : start + BLOCK], sp.csr_matrix(block, dtype=np.float32))
            seen = (block if every_item else block[:, candidates]).tocoo() if filter_already_liked_items else None
            if isinstance(block_scores, np.ndarray):
                block_scores = np.asarray(block_scores if every_item else block_scores[:, candidates], np.float32)
                if seen is not None:
                    block_scores[seen.row, seen.col] = -np.inf
                top = _best_columns(block_scores, width)
                block_best = np.take_along_axis(block_scores, top, axis=1)
            else:  # a torch tensor on the model's device: rank there, bring back the top only
                top, block_best = _best_columns_on_device(block_scores, candidates, every_item, seen, width)
            ids[start : start + BLOCK] = candidates[top]
            scores[start : start + BLOCK] = np.where(np.isfinite(block_best), block_best, np.finfo(np.float32).min)
        return (ids[0], scores[0]) if single else (ids, scores)


def _best_columns(scores: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` best columns of each row, best first, ties to the lower column (so
    results never depend on how a partial sort happened to break them)."""
    n_rows, n_cols = scores.shape
    if width == 0:
        return np.zeros((n_rows, 0), np.int64)
    if width < n_cols:
        kth = -np.partition(-scores, width - 1, axis=1)[:, width - 1 : width]
        chosen = scores >= kth
        # Rows with exactly ``width`` such columns are done; rows where the
        # ``width``-th score is tied keep the tied columns of lowest index.
        tied = np.flatnonzero(chosen.sum(axis=1) > width)
        if len(tied):
            better = scores[tied] > kth[tied]
            equal = chosen[tied] & ~better
            need = width - better.sum(axis=1, keepdims=True)
            chosen[tied] = better | (equal & (np.cumsum(equal, axis=1) <= need))
        top = np.nonzero(chosen)[1].reshape(n_rows, width)
    else:
        top = np.broadcast_to(np.arange(n_cols), scores.shape)
    order = np.lexsort((top, -np.take_along_axis(scores, top, axis=1)), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _best_columns_on_device(
    scores: Any, candidates: np.ndarray, every_item: bool, seen: sp.coo_matrix | None, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """``_best_columns`` of a torch tensor, on its device: a stable descending sort keeps
    tied columns in index order, so the result is the same, and only the best ``width``
    columns of each row travel to the host (41k items a user took a minute a pass on the
    host at Gowalla's size)."""
    import torch

    if not every_item:
        scores = scores[:, torch.from_numpy(candidates).to(scores.device)]
    if seen is not None:
        rows = torch.from_numpy(seen.row.astype(np.int64)).to(scores.device)
        cols = torch.from_numpy(seen.col.astype(np.int64)).to(scores.device)
        scores[rows, cols] = -torch.inf
    best, top = torch.sort(scores, dim=1, descending=True, stable=True)
    return top[:, :width].cpu().numpy(), best[:, :width].cpu().numpy()


class Popularity(ScoringRecommender):
    """The most popular unseen items for everyone: the bar every model must clear."""

    def fit(self, user_items: Any, show_progress: bool = False) -> Popularity:
        matrix = self._fit_matrix(user_items)
        self.item_counts_ = np.asarray(matrix.sum(axis=0)).ravel().astype(np.float32)
        return self

    def scores(self, userids: np.ndarray, user_rows: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.item_counts_, (user_rows.shape[0], len(self.item_counts_))).copy()


class EASE(ScoringRecommender):
    """Embarrassingly shallow autoencoder (Steck 2019): closed-form item-item weights.

    Parameters
    ----------
    regularization : float
        lambda added to the Gram matrix's diagonal (Steck: a few hundred on
        MovieLens-sized data; tune it on validation). At most 1e12: the weights
        fall like 1/lambda^2 and past about 1e19 they underflow float32 to zero.
    device : str or torch.device, optional
        Where torch inverts the Gram matrix and scores (e.g. ``"cuda"``: seconds
        instead of minutes at 40k items). None: numpy and LAPACK on the CPU.
    """

    def __init__(self, regularization: float = 500.0, device: Any = None) -> None:
        super().__init__()
        self.regularization = check_float(
            regularization, "regularization", minimum=0.0, strict=True, maximum=MAX_REGULARIZATION
        )
        if device is not None:
            import torch

            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from error
        self.device = device

    def fit(self, user_items: Any, show_progress: bool = False) -> EASE:
        import scipy.linalg

        matrix = self._fit_matrix(user_items)
        if self.device is not None:
            self.item_weights_ = self._fit_torch(matrix)
            return self
        # float32 and in place: the items x items matrix is the whole cost (6.7 GB
        # and a few minutes at 41k items), so it is held once. The Gram matrix is
        # symmetric: whichever layout scipy returns, it or its transpose is the
        # Fortran-ordered array LAPACK works on in place.
        gram = (matrix.T @ matrix).toarray()
        if not gram.flags.f_contiguous:
            gram = gram.T
        gram[np.diag_indices_from(gram)] += self.regularization
        # P = G^-1 from its Cholesky factor (G is symmetric positive definite).
        factor, info = scipy.linalg.lapack.spotrf(gram, lower=True, overwrite_a=True)
        if info == 0:
            precision, info = scipy.linalg.lapack.spotri(factor, lower=True, overwrite_c=True)
        if info != 0:
            raise _singular(f"LAPACK info {info}")
        del gram, factor
        _mirror_lower_triangle(precision)  # LAPACK filled the lower triangle only
        precision = precision.T  # symmetric again: the C-ordered view, no copy
        diagonal = np.diag(precision).copy()
        precision /= -diagonal[None, :]
        precision[np.diag_indices_from(precision)] = 0.0
        self.item_weights_ = precision
        return self

    def _fit_torch(self, matrix: sp.csr_matrix) -> Any:
        """The same closed form on ``self.device``: the weights stay there as a float32 tensor."""
        import torch

        gram = torch.from_numpy((matrix.T @ matrix).toarray()).to(self.device)
        gram.diagonal().add_(self.regularization)
        factor, info = torch.linalg.cholesky_ex(gram)
        del gram
        if int(info) != 0:
            raise _singular(f"Cholesky info {int(info)}")
        precision = torch.cholesky_inverse(factor)
        del factor
        precision /= -precision.diagonal().clone()[None, :]
        precision.diagonal().zero_()
        return precision

    def scores(self, userids: np.ndarray, user_rows: sp.csr_matrix) -> np.ndarray:
        if self.device is None:
            return np.asarray(user_rows @ self.item_weights_)
        import torch

        rows = torch.from_numpy(user_rows.toarray()).to(self.device)
        return rows @ self.item_weights_  # ranked on the device by recommend


def _singular(detail: str) -> np.linalg.LinAlgError:
    """The error of a Gram matrix that float32 Cholesky cannot factor (items that repeat one
    another, and a regularisation too small to tell them apart)."""
    return np.linalg.LinAlgError(
        f"EASE: the Gram matrix plus regularization is singular in float32 ({detail}); raise regularization"
    )


class RP3beta(ScoringRecommender):
    """Random-walk item-item recommender (Paudel et al. 2017), as in Dacrema et al.'s
    baselines: ``W = (P_iu^alpha)(P_ui^alpha)``, columns divided by popularity^beta,
    each row keeping its ``top_k`` largest entries.

    Parameters
    ----------
    alpha : float
        Exponent of the transition probabilities (1: a plain random walk).
    beta : float
        How much popular target items are penalised (0: not at all).
    top_k : int
        Neighbours kept per item.
    normalize : bool
        Scale each item's row of weights to sum to one.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, top_k: int = 200, normalize: bool = True) -> None:
        super().__init__()
        self.alpha = check_float(alpha, "alpha", minimum=0.0)
        self.beta = check_float(beta, "beta", minimum=0.0)
        self.top_k = check_int(top_k, "top_k")
        self.normalize = bool(normalize)

    def fit(self, user_items: Any, show_progress: bool = False) -> RP3beta:
        matrix = self._fit_matrix(user_items)
        user_degree = np.asarray(matrix.sum(axis=1)).ravel()
        item_degree = np.asarray(matrix.sum(axis=0)).ravel()
        user_to_item = sp.diags(1.0 / np.maximum(user_degree, 1)) @ matrix  # P_ui, rows sum to 1
        item_to_user = sp.diags(1.0 / np.maximum(item_degree, 1)) @ matrix.T.tocsr()  # P_iu
        user_to_item.data **= self.alpha
        item_to_user.data **= self.alpha
        penalty = 1.0 / np.power(np.maximum(item_degree, 1), self.beta)
        rows, cols, vals = [], [], []
        k = min(self.top_k, self.n_items)
        for start in range(0, self.n_items, BLOCK):
            block = (item_to_user[start : start + BLOCK] @ user_to_item).toarray() * penalty[None, :]
            top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < self.n_items else None
            if top is None:
                top = np.broadcast_to(np.arange(self.n_items), block.shape)
            values = np.take_along_axis(block, top, axis=1)
            keep = values > 0
            rows.append(np.repeat(np.arange(start, start + len(block)), k)[keep.ravel()])
            cols.append(top[keep])
            vals.append(values[keep])
        weights = sp.csr_matrix(
            (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
            shape=(self.n_items, self.n_items),
        )
        if self.normalize:
            sums = np.asarray(weights.sum(axis=1)).ravel()
            weights = sp.diags(1.0 / np.where(sums > 0, sums, 1.0)) @ weights
        self.item_weights_ = sp.csr_matrix(weights, dtype=np.float32)
        return self

    def scores(self, userids: np.ndarray, user_rows: sp.csr_matrix) -> np.ndarray:
        return (user_rows @ self.item_weights_).toarray()


def _mirror_lower_triangle(matrix: np.ndarray, block: int = 2048) -> None:
    """Copies the lower triangle of a square matrix onto its upper one, in place, a
    block of rows at a time (index arrays for the whole triangle would not fit)."""
    n = len(matrix)
    for start in range(0, n, block):
        stop = min(n, start + block)
        matrix[start:stop, stop:] = matrix[stop:, start:stop].T
        square = matrix[start:stop, start:stop]
        matrix[start:stop, start:stop] = np.tril(square) + np.tril(square, -1).T
