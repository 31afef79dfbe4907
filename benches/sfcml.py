"""A sampling-free loss on normalised vectors (SFCML, Bao et al., TPAMI 2023), as a
prototype to measure before it earns a place in the library.

Users and items live on the unit sphere, where the squared distance is
``2 - 2 u.v``, so ranking by ``s = 2 u.v`` is ranking by distance. Instead of
sampled negatives, each user's loss is the mean over every (positive i,
negative j) pair of ``(margin - (s_i - s_j))^2``. Because the square expands,
that mean needs only per-user means of ``s - margin * y`` and of its square
over positives and negatives: O(items) per user, no sampling. Tuned on
validation like a baseline (margin, learning rate; epochs by early stopping).

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

    def loss(self, users: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over users (with a positive and a negative) of mean_{i in P, j in N} (m - (s_i - s_j))^2."""
        scores = 2.0 * torch.nn.functional.embedding(users, self.users) @ self.items.T
        diff = scores - self.margin * targets
        negatives = 1.0 - targets
        n_pos, n_neg = targets.sum(1), negatives.sum(1)
        kept = (n_pos > 0) & (n_neg > 0)
        n_pos, n_neg = n_pos.clamp_min(1), n_neg.clamp_min(1)
        mean_pos = (diff * targets).sum(1) / n_pos
        mean_neg = (diff * negatives).sum(1) / n_neg
        square_pos = (diff.pow(2) * targets).sum(1) / n_pos
        square_neg = (diff.pow(2) * negatives).sum(1) / n_neg
        per_user = square_pos + square_neg - 2.0 * mean_pos * mean_neg
        return per_user[kept].mean()

    @torch.no_grad()
    def _normalise(self) -> None:
        for weight in (self.users, self.items):
            weight.copy_(torch.nn.functional.normalize(weight, dim=1))

    def fit(self, user_items: Any, show_progress: bool = False) -> SamplingFreeCML:
        matrix = self._fit_matrix(user_items)
        torch.set_num_threads(max(self.threads, 1))
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
                targets = torch.from_numpy(matrix[batch].toarray())
                loss = self.loss(torch.from_numpy(batch), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                self._normalise()
            if self.validation is None or (epoch + 1) % self.eval_every:
                continue
            recall = evaluation.ranking_metrics_at_k(self, matrix, self.validation, K=50)["recall"]
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
