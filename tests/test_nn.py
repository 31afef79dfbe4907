"""The torch losses: the cheap training path equals the reference formulation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cml_rs import nn


def batch(seed: int = 0, n_users: int = 30, n_items: int = 50, size: int = 64, negatives: int = 7):
    generator = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users, (size,), generator=generator)
    positives = torch.randint(0, n_items, (size,), generator=generator)
    negs = torch.randint(0, n_items, (size, negatives), generator=generator)
    return users, positives, negs


@pytest.mark.parametrize("rank_weighted", [True, False])
def test_cheap_warp_loss_equals_the_reference_with_gradients(rank_weighted):
    users, positives, negatives = batch()
    a = nn.CMLEmbedding(30, 50, 8, generator=torch.Generator().manual_seed(1))
    b = nn.CMLEmbedding(30, 50, 8, generator=torch.Generator().manual_seed(1))
    fast = a.warp_loss(users, positives, negatives, margin=1.0, n_items=50, rank_weighted=rank_weighted)
    pos, neg = b.distances(users, positives, negatives)
    slow = nn.warp_metric_loss(pos, neg, margin=1.0, n_items=50, rank_weighted=rank_weighted)
    fast.backward()
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    torch.testing.assert_close(a.items.grad, b.items.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.users.grad, b.users.grad, rtol=1e-4, atol=1e-6)


def test_warp_loss_by_hand():
    pos = torch.tensor([1.0])
    neg = torch.tensor([[0.2, 2.0, 1.4, 3.0]])
    # hinges with margin 0.5: 1.3, -0.5, 0.1, -1.5; two impostors of four; J = 100
    weight = np.log(100 * 2 // 4 + 1)
    assert nn.warp_metric_loss(pos, neg, 0.5, 100).item() == pytest.approx(weight * 1.3, rel=1e-6)
    assert nn.warp_metric_loss(pos, neg, 0.5, 100, rank_weighted=False).item() == pytest.approx(1.3)
    all_impostors = nn.warp_metric_loss(pos, neg, 0.5, 100, hardest_only=False).item()
    assert all_impostors == pytest.approx(weight * (1.3 + 0.1) / 2, rel=1e-6)


def test_covariance_loss_is_the_squared_off_diagonal_and_its_gradient_is_exact():
    torch.manual_seed(0)
    users = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    items = torch.randn(25, 5, dtype=torch.float64, requires_grad=True)
    x = torch.cat([users, items])
    centred = x - x.mean(0)
    cov = centred.T @ centred / len(x)
    want = (cov**2).sum() - (torch.diagonal(cov) ** 2).sum()
    assert nn.covariance_loss(users, items).item() == pytest.approx(want.item(), rel=1e-10)
    assert torch.autograd.gradcheck(nn.covariance_loss, (users, items))
    # Uncorrelated columns cost nothing (rows of a 4 x 4 Hadamard matrix, centred,
    # have zero off-diagonal covariance) ...
    hadamard = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    assert nn.covariance_loss(hadamard[:, 1:]).item() == pytest.approx(0.0, abs=1e-12)
    # ... while perfectly anti-correlated ones cost as much as correlated ones
    # (the reference code's signed sum would have rewarded them with a negative loss).
    anti = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    same = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert nn.covariance_loss(anti).item() == pytest.approx(2.0)  # C = [[1, -1], [-1, 1]]
    assert nn.covariance_loss(same).item() == pytest.approx(2.0)


def test_clip_keeps_rows_in_the_ball():
    vectors = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    clipped = nn.clip_rows(vectors, 1.0)
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    model = nn.CMLEmbedding(100, 100, 10)
    assert float(model.users.detach().norm(dim=1).max()) <= 1.0 + 1e-6


def test_feature_projector_takes_sparse_input_and_stays_in_the_ball():
    dense = torch.rand(6, 9, generator=torch.Generator().manual_seed(3))
    dense[dense < 0.6] = 0
    dense[-1] = 0  # a last row without features: an empty bag
    projector = nn.FeatureProjector(9, 4, dropout=0.0)
    out_dense = projector(dense)
    out_dense.pow(2).sum().backward()
    want = [p.grad.clone() for p in projector.parameters()]
    for sparse in (dense.to_sparse(), sp.csr_matrix(dense.numpy())):
        projector.zero_grad()
        out_sparse = projector(sparse)
        torch.testing.assert_close(out_dense, out_sparse, rtol=1e-5, atol=1e-6)
        out_sparse.pow(2).sum().backward()
        for got, expected in zip((p.grad for p in projector.parameters()), want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(out_dense.detach().norm(dim=1).max()) <= 1.0 + 1e-6
    # The first layer keeps its (hidden, features) shape, stored feature-major.
    assert projector.hidden.weight.shape == (256, 9) and projector.hidden.weight.T.is_contiguous()


def test_feature_loss_by_hand():
    projected = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    items = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    # ||(0, 1)||^2 + ||(3, -4)||^2 = 1 + 25
    assert nn.feature_loss(projected, items).item() == pytest.approx(26.0)
