"""The paper's embedding map: t-SNE of item vectors coloured by an item
attribute, as in the paper's figures, optionally beside the same map of raw features.

Needs matplotlib and scikit-learn (``pip install 'cml-rs[plot]'``).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["plot_item_embedding", "tsne_2d"]


def tsne_2d(vectors: Any, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``vectors`` (dense, or sparse reduced to 50 dims by truncated SVD first)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.manifold import TSNE

    if sp.issparse(vectors):
        n_components = max(2, min(50, vectors.shape[1] - 1))
        vectors = TruncatedSVD(n_components=n_components, random_state=seed).fit_transform(vectors)
    vectors = np.asarray(vectors, dtype=np.float32)
    perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)


def plot_item_embedding(
    item_vectors: Any,
    labels: Any,
    path: str | os.PathLike,
    features: Any | None = None,
    max_items: int = 3000,
    top_labels: int = 10,
    seed: int = 0,
    title: str = "items coloured by their label",
) -> str:
    """Saves a PNG of the item vectors' t-SNE map, coloured by ``labels``.

    Parameters
    ----------
    item_vectors : array (n_items, d) or a fitted model
    labels : array of str (n_items,)
        One attribute per item (top tag, genre, cluster). The ``top_labels``
        most frequent among the plotted items get colours; the rest are grey.
    path : str
        Where the PNG goes.
    features : array or sparse matrix (n_items, F), optional
        Raw item features, mapped the same way in a second panel for comparison.
    max_items : int
        Items plotted (a seeded sample; items carrying a top label are preferred).
    title : str
        Figure title: what the colours mean (the panels name what is mapped).

    Returns
    -------
    str
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vectors = item_vectors.item_factors if hasattr(item_vectors, "item_factors") else np.asarray(item_vectors)
    labels = np.asarray(labels).astype(str)
    if len(labels) != len(vectors):
        raise ValueError(f"labels has {len(labels)} entries but there are {len(vectors)} item vectors")
    rng = np.random.default_rng(seed)
    common = [label for label, _ in Counter(labels[labels != "none"]).most_common(top_labels)]
    in_common = np.flatnonzero(np.isin(labels, common))
    chosen = (
        rng.choice(in_common, min(max_items, len(in_common)), replace=False) if len(in_common) else np.array([], int)
    )
    if len(chosen) < max_items:
        rest = np.setdiff1d(np.arange(len(vectors)), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, min(max_items - len(chosen), len(rest)), replace=False)])
    chosen = np.sort(chosen)

    panels = [("CML item vectors", vectors[chosen])]
    if features is not None:
        raw = features[chosen] if sp.issparse(features) else np.asarray(features)[chosen]
        panels.insert(0, ("raw item features", raw))
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6.5), squeeze=False)
    colours = plt.get_cmap("tab10" if top_labels <= 10 else "tab20")
    for axis, (name, data) in zip(axes[0], panels):
        points = tsne_2d(data, seed=seed)
        other = ~np.isin(labels[chosen], common)
        axis.scatter(points[other, 0], points[other, 1], s=3, c="lightgrey", label="other")
        for i, label in enumerate(common):
            mask = labels[chosen] == label
            axis.scatter(points[mask, 0], points[mask, 1], s=5, color=colours(i % colours.N), label=label)
        axis.set_title(f"{name} (t-SNE, {len(chosen)} items)")
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return os.fspath(path)
