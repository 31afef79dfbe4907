"""A sampling-free loss on normalised vectors (SFCML, Bao et al., TPAMI 2023), as a
prototype to measure before it earns a place in the library.

Users and items live on the unit sphere, where the squared distance is
``2 - 2 u.v``, so ranking by ``s = 2 u.v`` is ranking by distance. Instead of
sampled negatives, each user's loss is the mean over every (positive i,
negative j) pair of ``(margin - (s_i - s_j))^2``. Because the square expands,
that mean needs only per-user means of ``s - margin * y`` and of its square
over positives and negatives, and the negatives' follow from sums over every
item, which factor through ``sum_j v_j`` and ``V^T V``: no sampling, and no
user-by-item matrix either. Tuned on validation like a baseline (margin,
learning rate; epochs by early stopping).

    python benches/panel.py --datasets ml-100k --seeds 0 1 2 --models sfcml
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from cml_rs import baselines, evaluation


class SamplingFreeCML(baselines.ScoringRecommender):
    """Unit vectors scored by 2 u.v, trained on the all-pairs squared loss."""

    def __init__(
        self,
        margin: float,
        learning_rate: float,
        seed: int,
        threads: int,
        validation: sp.csr_matrix | None = None,
        dim: int = 100,
        batch_users: int = 256,
        max_epochs: int = 300,
        eval_every: int = 2,
        patience: int = 5,
    ) -> None:
        super().__init__()
        self.margin, self.learning_rate, self.seed, self.threads = margin, learning_rate, seed, threads
        self.validation, self.dim, self.batch_users = validation, dim, batch_users
        self.max_epochs, self.eval_every, self.patience = max_epochs, eval_every, patience
        self.epochs_ = 0

    def loss(self, users: torch.Tensor, positives: sp.csr_matrix) -> torch.Tensor:
        """Mean over users (with a positive and a negative) of mean_{i in P, j in N} (m - (s_i - s_j))^2.

        The sums over a user's negatives are the sums over every item less those over
        the positives, and the sums over every item need only ``sum_j v_j`` and
        ``V^T V``: O(nnz * dim + items * dim^2) a batch, where scoring every item
        would cost O(users * items * dim), which is what made large data sets slow.
        """
        user_vectors = torch.nn.functional.embedding(users, self.users, sparse=True)
        counts = np.diff(positives.indptr)
        rows = torch.from_numpy(np.repeat(np.arange(positives.shape[0]), counts))
        cols = torch.from_numpy(positives.indices.astype(np.int64))
        positive_scores = 2.0 * (user_vectors[rows] * self.items[cols]).sum(1)
        zeros = user_vectors.new_zeros(len(users))
        sum_pos = zeros.index_add(0, rows, positive_scores)
        sum_pos_sq = zeros.index_add(0, rows, positive_scores.pow(2))
        sum_all = 2.0 * user_vectors @ self.items.sum(0)
        sum_all_sq = 4.0 * ((user_vectors @ (self.items.T @ self.items)) * user_vectors).sum(1)
        n_pos = torch.from_numpy(counts).to(zeros.dtype)
        n_neg = self.items.shape[0] - n_pos
        kept = (n_pos > 0) & (n_neg > 0)
        n_pos, n_neg = n_pos.clamp_min(1), n_neg.clamp_min(1)
        # d = s - margin on positives and s on negatives; the pair loss is (d_i - d_j)^2.
        mean_pos = sum_pos / n_pos - self.margin
        square_pos = (sum_pos_sq - 2.0 * self.margin * sum_pos) / n_pos + self.margin**2
        mean_neg = (sum_all - sum_pos) / n_neg
        square_neg = (sum_all_sq - sum_pos_sq) / n_neg
        per_user = square_pos + square_neg - 2.0 * mean_pos * mean_neg
        return per_user[kept].mean()

    @torch.no_grad()
    def _normalise(self, users: torch.Tensor | None = None) -> None:
        """Put the items and the given users (all when None) back on the unit sphere."""
        self.items.copy_(torch.nn.functional.normalize(self.items, dim=1))
        if users is None:
            self.users.copy_(torch.nn.functional.normalize(self.users, dim=1))
        else:
            self.users[users] = torch.nn.functional.normalize(self.users[users], dim=1)

    def fit(self, user_items: Any, show_progress: bool = False) -> SamplingFreeCML:
        matrix = self._fit_matrix(user_items)
        torch.set_num_threads(max(self.threads, 1))
        torch.sparse.check_sparse_tensor_invariants.disable()  # the default, said aloud to silence its warning
        generator = torch.Generator().manual_seed(self.seed)
        scale = 1.0 / math.sqrt(self.dim)
        self.users = torch.nn.Parameter(torch.randn(self.n_users, self.dim, generator=generator) * scale)
        self.items = torch.nn.Parameter(torch.randn(self.n_items, self.dim, generator=generator) * scale)
        self._normalise()
        optimizer = torch.optim.Adagrad([self.users, self.items], lr=self.learning_rate)
        rng = np.random.default_rng(self.seed)
        best, best_state, stale = -1.0, None, 0
        for epoch in range(self.max_epochs):
            order = rng.permutation(self.n_users)
            for start in range(0, self.n_users, self.batch_users):
                batch = np.sort(order[start : start + self.batch_users])
                users = torch.from_numpy(batch)
                loss = self.loss(users, matrix[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()  # a sparse gradient: only this batch's users move
                self._normalise(users)
            if self.validation is None or (epoch + 1) % self.eval_every:
                continue
            # On the unit sphere distance ranks as 2 u.v does, so the metric top-K kernel serves.
            vectors = (self.users.detach().numpy(), self.items.detach().numpy())
            recall = evaluation.ranking_metrics_at_k(
                vectors, matrix, self.validation, K=50, num_threads=max(self.threads, 1)
            )["recall"]
            if recall > best:
                best, stale, self.epochs_ = recall, 0, epoch + 1
                best_state = (self.users.detach().clone(), self.items.detach().clone())
            else:
                stale += 1
                if stale >= self.patience:
                    break
        if best_state is not None:
            with torch.no_grad():
                self.users.copy_(best_state[0])
                self.items.copy_(best_state[1])
        return self

    @torch.no_grad()
    def scores(self, userids: np.ndarray, user_rows: sp.csr_matrix) -> np.ndarray:
        users = torch.from_numpy(np.asarray(userids, np.int64))
        return (2.0 * self.users[users] @ self.items.T).numpy()
