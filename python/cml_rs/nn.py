"""The torch side of CML: the embedding module and the loss terms (Hsieh et al. 2017).

For people with their own training loop::

    from cml_rs import WarpSampler, nn

    model = nn.CMLEmbedding(n_users, n_items, dim=100)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for users, positives, negatives in WarpSampler(train, batch_size=4096):
        users, positives, negatives = map(torch.from_numpy, (users, positives, negatives))
        pos_dist, neg_dist = model.distances(users, positives, negatives)
        loss = nn.warp_metric_loss(pos_dist, neg_dist, margin=1.5, n_items=n_items)
        loss = loss + 10.0 * nn.covariance_loss(model.all_vectors())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clip_to_ball()
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from . import _native

__all__ = [
    "CMLEmbedding",
    "FeatureProjector",
    "clip_rows",
    "covariance_loss",
    "feature_loss",
    "rank_weights_torch",
    "torch_sparse",
    "warp_metric_loss",
]


class CMLEmbedding(torch.nn.Module):
    """User and item vectors in one Euclidean space, each kept inside a ball.

    Vectors start as N(0, 1/sqrt(dim)) per coordinate (row norms near 1) and
    are clipped to ``max_norm`` at once and after every optimiser step
    (:meth:`clip_to_ball`).
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 100,
        max_norm: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.max_norm = float(max_norm)
        scale = 1.0 / math.sqrt(dim)
        self.users = torch.nn.Parameter(torch.randn(n_users, dim, generator=generator) * scale)
        self.items = torch.nn.Parameter(torch.randn(n_items, dim, generator=generator) * scale)
        self.clip_to_ball()

    @classmethod
    def from_vectors(cls, users: Tensor, items: Tensor, max_norm: float = 1.0) -> CMLEmbedding:
        """An embedding holding the given vectors (already inside the ball) as its parameters."""
        embedding = cls(1, 1, int(users.shape[1]), max_norm)
        embedding.users = torch.nn.Parameter(users)
        embedding.items = torch.nn.Parameter(items)
        return embedding

    @property
    def dim(self) -> int:
        return int(self.users.shape[1])

    def user_rows(self, ids: Tensor) -> Tensor:
        """The vectors of users ``ids`` (any shape), differentiable.

        A lookup rather than ``users[ids]``: on the CPU the backward of tensor
        indexing adds repeated rows' gradients in a thread-dependent order, so
        a seeded fit would not repeat itself; the embedding backward does.
        """
        return torch.nn.functional.embedding(ids, self.users)

    def item_rows(self, ids: Tensor) -> Tensor:
        """The vectors of items ``ids`` (any shape), differentiable (see :meth:`user_rows`)."""
        return torch.nn.functional.embedding(ids, self.items)

    def distances(self, users: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        """Squared distances user-positive (B,) and user-negatives (B, U)."""
        u = self.user_rows(users)
        pos_dist = (u - self.item_rows(positives)).pow(2).sum(-1)
        neg_dist = (u.unsqueeze(1) - self.item_rows(negatives)).pow(2).sum(-1)
        return pos_dist, neg_dist

    def warp_loss(
        self,
        users: Tensor,
        positives: Tensor,
        negatives: Tensor,
        margin: float,
        n_items: int,
        hardest_only: bool = True,
        rank_weighted: bool = True,
    ) -> Tensor:
        """:func:`warp_metric_loss` of a batch, computed cheaply.

        Distances to all U negatives are needed only to count impostors and
        find the hardest, so they are computed without autograd; the hardest
        negative's distance is then recomputed with it. The value and the
        gradients equal ``warp_metric_loss(*self.distances(...))``.
        """
        if not hardest_only:
            return warp_metric_loss(*self.distances(users, positives, negatives), margin, n_items, False, rank_weighted)
        u = self.user_rows(users)
        pos_dist = (u - self.item_rows(positives)).pow(2).sum(-1)
        weights, hardest = self.hardest_negatives(u.detach(), negatives, pos_dist.detach(), margin, n_items)
        chosen = negatives.gather(1, hardest.to(negatives.device).unsqueeze(1)).squeeze(1)
        hardest_dist = (u - self.item_rows(chosen)).pow(2).sum(-1)
        return _weighted_sum(torch.relu(margin + pos_dist - hardest_dist), weights, rank_weighted)

    def hardest_negatives(
        self, u: Tensor, negatives: Tensor, pos_dist: Tensor, margin: float, n_items: int
    ) -> tuple[Tensor, Tensor]:
        """WARP weights (B,) and the index of each row's hardest negative (B,), without
        autograd. On the CPU the native kernel reads the negatives' rows by id, so
        their (B, U, dim) differences are never materialised."""
        if u.device.type == "cpu" and u.dtype == torch.float32 and self.items.dtype == torch.float32:
            weights, hardest = _native.rank_weights_by_id(
                np.ascontiguousarray(u.numpy()),
                np.ascontiguousarray(self.items.detach().numpy()),
                np.ascontiguousarray(negatives.numpy(), dtype=np.int64),
                np.ascontiguousarray(pos_dist.numpy()),
                float(margin),
                int(n_items),
                torch.get_num_threads(),
            )
            return torch.from_numpy(weights), torch.from_numpy(hardest)
        with torch.no_grad():
            neg_dist = (u.unsqueeze(1) - self.items[negatives]).pow(2).sum(-1)
        return _rank_weights(pos_dist, neg_dist, margin, n_items)

    def all_vectors(self) -> Tensor:
        """Users and items stacked, the rows the covariance term is taken over."""
        return torch.cat([self.users, self.items], dim=0)

    @torch.no_grad()
    def clip_to_ball(self) -> None:
        """y <- y * max_norm / max(||y||, max_norm) for every row."""
        for weight in (self.users, self.items):
            weight.copy_(clip_rows(weight, self.max_norm))


def clip_rows(vectors: Tensor, max_norm: float) -> Tensor:
    """Rows scaled into the ball of radius ``max_norm`` (differentiable)."""
    norms = vectors.norm(dim=-1, keepdim=True).clamp_min(max_norm)
    return vectors * (max_norm / norms)


@torch.no_grad()
def rank_weights_torch(pos_dist: Tensor, neg_dist: Tensor, margin: float, n_items: int) -> tuple[Tensor, Tensor]:
    """WARP rank weights and hardest negatives on any device (same as :func:`cml_rs.rank_weights`).

    ``w = log(floor(n_items * M / U) + 1)`` with M the negatives inside the
    margin; ``hardest`` indexes the negative with the largest hinge.
    """
    n_negatives = neg_dist.shape[1]
    impostors = ((margin + pos_dist).unsqueeze(1) - neg_dist > 0).sum(dim=1)
    rank = torch.div(impostors * n_items, n_negatives, rounding_mode="floor")
    weights = torch.log((rank + 1).to(torch.float64)).to(neg_dist.dtype)
    return weights, neg_dist.argmin(dim=1)


def _rank_weights(pos_dist: Tensor, neg_dist: Tensor, margin: float, n_items: int) -> tuple[Tensor, Tensor]:
    """Rank weights from the native kernel on CPU, from torch elsewhere."""
    if pos_dist.device.type != "cpu" or pos_dist.dtype != torch.float32:
        return rank_weights_torch(pos_dist, neg_dist, margin, n_items)
    weights, hardest = _native.rank_weights(
        np.ascontiguousarray(pos_dist.numpy()),
        np.ascontiguousarray(neg_dist.numpy()),
        float(margin),
        int(n_items),
    )
    return torch.from_numpy(weights), torch.from_numpy(hardest)


def warp_metric_loss(
    pos_dist: Tensor,
    neg_dist: Tensor,
    margin: float,
    n_items: int,
    hardest_only: bool = True,
    rank_weighted: bool = True,
) -> Tensor:
    """CML's metric loss L_m summed over the batch.

    Each pair contributes ``w * max(0, max_u (margin + d(i,j)^2 - d(i,k_u)^2))``
    with the WARP weight ``w`` (no gradient through it). With
    ``hardest_only=False`` every impostor counts, each weighted by ``w / M``;
    with ``rank_weighted=False``, ``w = 1``.
    """
    hinge = (margin + pos_dist).unsqueeze(1) - neg_dist
    weights, hardest = _rank_weights(pos_dist.detach(), neg_dist.detach(), margin, n_items)
    if hardest_only:
        pair_loss = torch.relu(hinge.gather(1, hardest.to(hinge.device).unsqueeze(1)).squeeze(1))
    else:
        impostors = (hinge > 0).sum(dim=1).clamp_min(1)
        pair_loss = torch.relu(hinge).sum(dim=1) / impostors
    return _weighted_sum(pair_loss, weights, rank_weighted)


def _weighted_sum(pair_loss: Tensor, weights: Tensor, rank_weighted: bool) -> Tensor:
    if rank_weighted:
        pair_loss = pair_loss * weights.to(pair_loss.device)
    return pair_loss.sum()


def covariance_loss(*blocks: Tensor) -> Tensor:
    """Sum of squared off-diagonal entries of the covariance of the rows' columns.

    The rows are those of all ``blocks`` stacked (e.g. the user and the item
    vectors), without copying them together. C = X_c^T X_c / N with X_c
    mean-centred; penalising C_ab^2 (a != b) decorrelates the dimensions. (The
    authors' TensorFlow code summed the signed entries, which rewards negative
    correlation instead of removing it.) The gradient is
    computed in closed form, ``4 / N * X_c C_off``: one Gram product forward
    and one product backward, about half of what autograd spends.
    """
    return _CovariancePenalty.apply(*blocks)


class _CovariancePenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *blocks: Tensor) -> Tensor:
        n_rows = sum(block.shape[0] for block in blocks)
        mean = sum(block.sum(dim=0) for block in blocks) / n_rows
        gram = sum(block.T @ block for block in blocks)
        cov = gram / n_rows - torch.outer(mean, mean)
        off_diagonal = cov - torch.diag(torch.diagonal(cov))
        ctx.save_for_backward(off_diagonal, mean, *blocks)
        ctx.n_rows = n_rows
        return off_diagonal.pow(2).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        off_diagonal, mean, *blocks = ctx.saved_tensors
        scale = grad * (4.0 / ctx.n_rows)
        return tuple(
            ((block - mean) @ off_diagonal) * scale if needs else None
            for block, needs in zip(blocks, ctx.needs_input_grad)
        )


class FeatureProjector(torch.nn.Module):
    """f(x): item features -> 256 ReLU -> dim, dropout 0.5, output clipped to the ball (CML+F)."""

    def __init__(self, n_features: int, dim: int, hidden: int = 256, dropout: float = 0.5, max_norm: float = 1.0):
        super().__init__()
        self.hidden = torch.nn.Linear(n_features, hidden)
        # The first layer's weight keeps its (hidden, F) shape (saved models) but is
        # stored feature-major, so a sparse batch reads one contiguous row per
        # feature it holds (an embedding bag) instead of a strided column.
        self.hidden.weight = torch.nn.Parameter(self.hidden.weight.detach().T.contiguous().T)
        self.output = torch.nn.Linear(hidden, dim)
        self.dropout = torch.nn.Dropout(dropout)
        self.max_norm = float(max_norm)

    def forward(self, features: Any) -> Tensor:
        """``features``: a scipy sparse matrix (n, F), a dense tensor, or a torch sparse tensor."""
        if isinstance(features, Tensor) and not (features.is_sparse or features.layout == torch.sparse_csr):
            return self._top(self.hidden(features))
        if isinstance(features, Tensor):  # torch sparse: to scipy CSR on the host
            coo = features.to_sparse_coo().coalesce().cpu()
            rows, columns = coo.indices().numpy()
            features = sp.csr_matrix((coo.values().numpy(), (rows, columns)), shape=tuple(coo.shape))
        csr = sp.csr_matrix(features)
        device = self.hidden.weight.device
        hidden = torch.nn.functional.embedding_bag(
            torch.from_numpy(csr.indices.astype(np.int64)).to(device),
            self.hidden.weight.T,
            torch.from_numpy(csr.indptr[:-1].astype(np.int64)).to(device),
            mode="sum",
            per_sample_weights=torch.from_numpy(csr.data.astype(np.float32)).to(device),
        )
        return self._top(hidden + self.hidden.bias)

    def _top(self, hidden: Tensor) -> Tensor:
        return clip_rows(self.output(self.dropout(torch.relu(hidden))), self.max_norm)


def torch_sparse(matrix: Any) -> Tensor:
    """A scipy sparse matrix as a coalesced float32 torch COO tensor."""
    coo = matrix.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True).coalesce()


def torch_sparse_rows(matrix: Any, device: torch.device | str = "cpu") -> Tensor:
    """The pattern of a scipy sparse matrix (1 per stored entry) as a torch COO tensor on ``device``."""
    pattern = matrix.tocsr(copy=True)
    pattern.data = np.ones(len(pattern.data), dtype=np.float32)
    return torch_sparse(pattern).to(device)


def feature_loss(projected: Tensor, item_vectors: Tensor) -> Tensor:
    """L_f = sum_j ||f(x_j) - v_j||^2."""
    return (projected - item_vectors).pow(2).sum()
