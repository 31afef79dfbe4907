"""Shared fixtures. Tests run against the installed wheel, never the source tree."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import cml_rs

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    installed = Path(cml_rs.__file__).resolve()
    if (REPO_ROOT / "python") in installed.parents and not os.environ.get("CML_ALLOW_SOURCE_TREE"):
        raise pytest.UsageError(
            f"cml_rs was imported from the source tree ({installed}); install the wheel "
            f"(scripts/test.sh does) so the tests exercise what users get"
        )
    # Data: CML_DATA, else ../shared/data beside the repository.
    default = REPO_ROOT.parent / "shared" / "data"
    if "CML_DATA" not in os.environ and default.is_dir():
        os.environ["CML_DATA"] = str(default)


def data_path(*parts: str) -> Path:
    """A file under the data directory, or skip the test when the data is absent."""
    root = os.environ.get("CML_DATA")
    path = Path(root, *parts) if root else None
    if path is None or not path.exists():
        pytest.skip(f"dataset file {'/'.join(parts)} not found (set CML_DATA)")
    return path


def random_interactions(n_users: int, n_items: int, per_user: int, seed: int) -> sp.csr_matrix:
    """A seeded user x item CSR matrix with exactly `per_user` distinct items per user."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n_users), per_user)
    cols = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    data = np.ones(len(rows), dtype=np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(n_users, n_items))


@pytest.fixture
def interactions() -> sp.csr_matrix:
    return random_interactions(n_users=50, n_items=40, per_user=6, seed=0)


def pytest_report_header(config: pytest.Config) -> str:
    return f"cml_rs {cml_rs.__version__} from {Path(cml_rs.__file__).parent}, python {sys.version.split()[0]}"
