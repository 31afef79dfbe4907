"""Several vectors per user (DPCML, Bao et al., NeurIPS 2022), as a prototype to measure
before it earns a place in the library.

A user holds C vectors and sits at the distance of the nearest one to an item,
so a user with several tastes can be near several regions of the space. The
loss is CML's (the WARP-weighted hinge on the hardest of U sampled negatives,
plus the covariance penalty) with that nearest-vector distance, plus the
paper's diversity control (DCRS): a penalty when two vectors of a user are
closer than m1 or further than m2 (squared). The same loop with C = 1 is the
control, so the test isolates the extra vectors; the panel's ``cml`` job (the
package) is the reference for the loop itself.

    python benches/panel.py --datasets ml-100k --seeds 0 1 2 --models dpcml-1 dpcml-3 dpcml-3-dcrs0
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

import cml_rs
from cml_rs import baselines, evaluation, nn, training
from cml_rs._params import defaults

_CML = defaults()
#: The package's CML settings, and the diversity control of the DPCML paper's code.
SETTINGS = {
    **{
        name: _CML[name]
        for name in ("margin", "n_negatives", "lambda_c", "learning_rate", "batch_size", "eval_every", "patience")
    },
    "dim": _CML["factors"],
    "max_epochs": _CML["epochs"],
    "dcrs_weight": 10.0,
    "dcrs_low": 0.05,
    "dcrs_high": 0.25,
}


class NearestVectorCML(baselines.ScoringRecommender):
    """Users as C vectors each, items as one; an item's score is minus the squared
    distance to the user's nearest vector."""

    def __init__(self, n_users: int, n_items: int, vectors: int, dim: int, seed: int) -> None:
        super().__init__()
        self.n_users, self.n_items, self.vectors = n_users, n_items, vectors
        generator = torch.Generator().manual_seed(seed)
        scale = 1.0 / math.sqrt(dim)
        self.users = torch.nn.Parameter(torch.randn(n_users, vectors, dim, generator=generator) * scale)
        self.items = torch.nn.Parameter(torch.randn(n_items, dim, generator=generator) * scale)
        self.clip()

    @torch.no_grad()
    def clip(self) -> None:
        self.users.copy_(nn.clip_rows(self.users, 1.0))
        self.items.copy_(nn.clip_rows(self.items, 1.0))

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """(B, C, d), by an embedding lookup (its backward is deterministic, unlike indexing's)."""
        flat = torch.nn.functional.embedding(users, self.users.view(self.n_users, -1))
        return flat.view(len(users), self.vectors, -1)

    def nearest_distances(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Squared distance of each user (B,) to an item (B,), through the nearest of its vectors."""
        u = self.user_vectors(users)  # (B, C, d)
        v = torch.nn.functional.embedding(items, self.items)  # (B, d)
        return (u - v.unsqueeze(1)).pow(2).sum(-1).min(dim=1).values

    @torch.no_grad()
    def negative_distances(self, users: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """(B, U) squared distances to the nearest vector, without autograd."""
        u = self.users.view(self.n_users, self.vectors, -1)[users]  # (B, C, d)
        v = self.items[negatives]  # (B, U, d)
        d2 = u.pow(2).sum(-1, keepdim=True) - 2 * u @ v.transpose(1, 2) + v.pow(2).sum(-1).unsqueeze(1)
        return d2.min(dim=1).values

    def diversity_penalty(self, users: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """DCRS: mean of relu(low - d2) + relu(d2 - high) over the pairs of a user's vectors."""
        if self.vectors == 1:
            return self.users.new_zeros(())
        u = self.user_vectors(users)
        d2 = (u.unsqueeze(2) - u.unsqueeze(1)).pow(2).sum(-1)  # (B, C, C)
        pairs = ~torch.eye(self.vectors, dtype=torch.bool)
        d2 = d2[:, pairs]
        return (torch.relu(low - d2) + torch.relu(d2 - high)).mean()

    @torch.no_grad()
    def scores(self, userids: np.ndarray, user_rows: sp.csr_matrix) -> np.ndarray:
        u = self.users[torch.from_numpy(np.asarray(userids, np.int64))]  # (B, C, d)
        d2 = (u.pow(2).sum(-1, keepdim=True) - 2 * u @ self.items.T + self.items.pow(2).sum(-1)).min(dim=1).values
        return (-d2).numpy()


def fit_dpcml(
    vectors: int, train: sp.csr_matrix, validation: sp.csr_matrix, threads: int, seed: int, **settings: Any
) -> dict[str, Any]:
    """Trains to early stopping on validation recall@50 and returns the panel's job record;
    ``settings`` override :data:`SETTINGS`."""
    s = {**SETTINGS, **settings}
    torch.set_num_threads(max(threads, 1))
    n_users, n_items = train.shape
    model = NearestVectorCML(n_users, n_items, vectors, s["dim"], seed)
    optimizer = torch.optim.Adagrad([model.users, model.items], lr=s["learning_rate"])
    n_negatives = s["n_negatives"] if s["n_negatives"] is not None else training.negatives_for(train)
    sampler = cml_rs.WarpSampler(train, batch_size=s["batch_size"], n_negatives=n_negatives, seed=seed)
    best, best_state, best_epoch, stale, epoch = -1.0, None, 0, 0, 0
    start = time.perf_counter()
    for epoch in range(s["max_epochs"]):
        sampler.set_epoch(epoch)
        for users, positives, negatives in sampler:
            users, positives, negatives = (torch.from_numpy(a.astype(np.int64)) for a in (users, positives, negatives))
            pos = model.nearest_distances(users, positives)
            # As the package's cheap WARP path: the U negatives' distances only count
            # impostors and pick the hardest, so autograd sees the hardest alone.
            weights, hardest = nn.rank_weights_torch(
                pos.detach(), model.negative_distances(users, negatives), s["margin"], n_items
            )
            hard = model.nearest_distances(users, negatives.gather(1, hardest.unsqueeze(1)).squeeze(1))
            loss = (weights * torch.relu(s["margin"] + pos - hard)).sum()
            loss = loss + s["lambda_c"] * nn.covariance_loss(model.users.reshape(-1, s["dim"]), model.items)
            loss = loss + s["dcrs_weight"] * model.diversity_penalty(users, s["dcrs_low"], s["dcrs_high"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.clip()
        if (epoch + 1) % s["eval_every"]:
            continue
        recall = evaluation.ranking_metrics_at_k(model, train, validation, K=50)["recall"]
        elapsed = time.perf_counter() - start
        print(f"    dpcml-{vectors} epoch {epoch + 1}: validation recall@50 {recall:.4f} ({elapsed:.0f}s)", flush=True)
        if recall > best:
            best, best_epoch, stale = recall, epoch, 0
            best_state = (model.users.detach().clone(), model.items.detach().clone())
        else:
            stale += 1
            if stale >= s["patience"]:
                break
    assert best_state is not None
    with torch.no_grad():
        model.users.copy_(best_state[0])
        model.items.copy_(best_state[1])
    return {
        "model": model,
        "params": {**s, "n_negatives": n_negatives, "vectors": vectors},
        "fit_seconds": time.perf_counter() - start,
        "epochs": epoch + 1,
        "best_epoch": best_epoch,
        "validation_recall@50": best,
    }
