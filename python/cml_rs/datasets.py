"""Datasets: loaders for the benchmark sets, a generic loader, a synthetic
generator, and the paper's per-user 60/20/20 split (Hsieh et al. 2017).

Every loader takes a path (a dataset folder, or for the generic loader a file)
and returns a :class:`Dataset`: a CSR user x item matrix, optional item-feature
CSR matrices, the original ids behind each row and column, and a label per
item for plots. Without a path, loaders look in ``$CML_DATA/<name>`` and then
in ``shared/data/<name>`` beside any folder above the working directory (the
project's ``../shared/data``). A missing file raises ``FileNotFoundError``
naming it; a malformed line raises ``ValueError`` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from ._checks import as_csr
from ._io import meta_int, open_npz, save_npz

__all__ = [
    "DATASETS",
    "ColdStartSplit",
    "Dataset",
    "FoldInSplit",
    "Split",
    "data_home",
    "find_dataset",
    "load",
    "load_citeulike",
    "load_gowalla",
    "load_interactions",
    "load_movielens_1m_implicit",
    "load_movielens_100k",
    "load_movielens_latest_small",
    "split_cold_items",
    "split_fold_in_users",
    "split_paper",
    "synthetic",
]

SPLIT_FORMAT = "cml-rs-split"
SPLIT_VERSION = 2  # 2: the parts' values (confidence weights) are kept when they are not all 1


@dataclass
class Dataset:
    """Interactions plus what is known about them.

    Attributes
    ----------
    name : str
    user_items : scipy.sparse.csr_matrix, shape (n_users, n_items)
        1.0 for each positive interaction (values are kept for the generic loader).
    item_features : dict of str -> csr_matrix (n_items, n_features)
        Side information for CML+F (tags, words, genres).
    feature_names : dict of str -> list of str
        Column names of each feature matrix.
    user_features, user_feature_names : dict
        The same for users (ml-100k and ml-1m-implicit: age group, gender, occupation).
    user_ids, item_ids : ndarray
        The original id of each row / column.
    item_labels : ndarray of str, optional
        One attribute per item (top tag, first genre, cluster) for plots.
    item_label_kind : str
        What ``item_labels`` holds, in words ("top tag"), for plot titles.
    item_titles : ndarray of str, optional
        Human-readable item names where the data has them.
    given_split : Split, optional
        The split the data set ships with (gowalla, ml-1m-implicit).
    note : str
        What a loader detected and did (e.g. the separator and header of a CSV).
    """

    name: str
    user_items: sp.csr_matrix
    item_features: dict[str, sp.csr_matrix] = field(default_factory=dict)
    feature_names: dict[str, list[str]] = field(default_factory=dict)
    user_features: dict[str, sp.csr_matrix] = field(default_factory=dict)
    user_feature_names: dict[str, list[str]] = field(default_factory=dict)
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    item_labels: np.ndarray | None = None
    item_titles: np.ndarray | None = None
    given_split: Split | None = None
    item_label_kind: str = "label"
    note: str = ""

    @property
    def n_users(self) -> int:
        return int(self.user_items.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.user_items.shape[1])

    def __repr__(self) -> str:
        features = ", ".join(f"{k}: {v.shape[1]}" for k, v in self.item_features.items()) or "none"
        return (
            f"Dataset({self.name!r}, users={self.n_users}, items={self.n_items}, "
            f"interactions={self.user_items.nnz}, features=[{features}])"
        )


# --------------------------------------------------------------------------- locating data


def data_home() -> Path | None:
    """The data directory: ``$CML_DATA``, else the first ``shared/data`` found
    beside the working directory or one of its parents (the repo's ``../shared/data``)."""
    env = os.environ.get("CML_DATA")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        for candidate in (folder / "shared" / "data", folder.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    return None


def find_dataset(name: str) -> Path:
    """The folder of data set ``name`` under :func:`data_home`, or FileNotFoundError."""
    home = data_home()
    if home is None or not (home / name).is_dir():
        where = f"in {home}" if home else "(no data directory: set CML_DATA)"
        raise FileNotFoundError(f"data set folder {name!r} not found {where}")
    return home / name


def _folder(path: str | os.PathLike | None, name: str) -> Path:
    folder = Path(path) if path is not None else find_dataset(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder holding the {name} files")
    return folder


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"required file {path} is missing")
    return path


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of each line, blank lines included."""
    with open(_require(path), encoding=encoding) as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line.rstrip("\r\n")


def _ints(path: Path, number: int, text: str) -> list[int]:
    try:
        return [int(token) for token in text.split()]
    except ValueError:
        raise ValueError(f"{path}:{number}: expected whitespace-separated integers, got {text[:80]!r}") from None


def _counted_rows(path: Path) -> list[list[int]]:
    """Rows of a ``N id_1 ... id_N`` file (citeulike), the leading count checked and dropped."""
    rows = []
    for number, text in _lines(path):
        values = _ints(path, number, text)
        if not values:
            rows.append([])
            continue
        if values[0] != len(values) - 1:
            raise ValueError(f"{path}:{number}: the line starts with count {values[0]} but lists {len(values) - 1} ids")
        rows.append(values[1:])
    return rows


def _csr_from_rows(rows: list[list[int]], n_cols: int | None = None, path: Path | None = None) -> sp.csr_matrix:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(indptr[-1]))
    if len(indices) and indices.min() < 0:
        raise ValueError(f"{path}: negative id {indices.min()}")
    width = int(indices.max()) + 1 if len(indices) else 0
    if n_cols is None:
        n_cols = width
    elif width > n_cols:
        raise ValueError(f"{path}: id {width - 1} is beyond the {n_cols} known ids")
    matrix = sp.csr_matrix(
        (np.ones(len(indices), dtype=np.float32), indices.astype(np.int32), indptr),
        shape=(len(rows), n_cols),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _is_binary(matrix: sp.csr_matrix) -> bool:
    """Whether every stored value is 1 (an implicit-feedback matrix without weights)."""
    return bool(np.all(matrix.data == 1))


def _binary(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _top_feature_labels(features: sp.csr_matrix, names: list[str]) -> np.ndarray:
    """Each item's most common feature (by how many items carry it); "none" without one."""
    popularity = np.asarray(features.sum(axis=0)).ravel()
    labels = np.full(features.shape[0], "none", dtype=object)
    for item in range(features.shape[0]):
        cols = features.indices[features.indptr[item] : features.indptr[item + 1]]
        if len(cols):
            labels[item] = names[cols[np.argmax(popularity[cols])]]
    return labels.astype(str)


# --------------------------------------------------------------------------- loaders


def load_citeulike(path: str | os.PathLike | None = None, min_tag_items: int = 10) -> Dataset:
    """citeulike-t (Wang et al., IJCAI 2013): 7,947 users x 25,975 articles.

    The count that opens each line of users.dat and tag-item.dat is dropped
    (the paper-era loader read it as an item, which made five fake items
    the most popular and inflated the paper's CiteULike recall). Features:
    ``tags`` (items x tags on at least ``min_tag_items`` items, binary) and
    ``words`` (bag of words from mult.dat, counts).
    """
    folder = _folder(path, "citeulike-t")
    n_items = sum(1 for _ in _lines(_require(folder / "mult.dat")))
    users = _csr_from_rows(_counted_rows(folder / "users.dat"), n_items, folder / "users.dat")

    tag_rows = _counted_rows(folder / "tag-item.dat")
    tag_names = [text for _, text in _lines(folder / "tags.dat")]
    if len(tag_names) != len(tag_rows):
        raise ValueError(f"{folder / 'tags.dat'} names {len(tag_names)} tags but tag-item.dat has {len(tag_rows)}")
    tag_items = _csr_from_rows(tag_rows, n_items, folder / "tag-item.dat")  # tags x items
    keep = np.flatnonzero(np.diff(tag_items.indptr) >= min_tag_items)
    tags = tag_items[keep].T.tocsr()
    kept_names = [tag_names[t] for t in keep]

    words = _load_mult(folder / "mult.dat")
    vocabulary = [text for _, text in _lines(folder / "vocabulary.dat")] if (folder / "vocabulary.dat").exists() else []
    return Dataset(
        name="citeulike-t",
        user_items=users,
        item_features={"tags": tags, "words": words},
        feature_names={"tags": kept_names, "words": vocabulary},
        user_ids=np.arange(users.shape[0]),
        item_ids=np.arange(n_items),
        item_labels=_top_feature_labels(tags, kept_names),
        item_label_kind="top tag",
    )


def _load_mult(path: Path) -> sp.csr_matrix:
    """LDA-C ``M w:c w:c ...`` lines as an items x words count matrix."""
    indptr, indices, counts = [0], [], []
    for number, text in _lines(path):
        tokens = text.split()
        try:
            declared = int(tokens[0]) if tokens else 0
            pairs = [token.split(":") for token in tokens[1:]]
            words = [int(w) for w, _ in pairs]
            values = [float(c) for _, c in pairs]
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'M word:count ...', got {text[:80]!r}") from None
        if declared != len(words):
            raise ValueError(f"{path}:{number}: declares {declared} words but lists {len(words)}")
        indices.extend(words)
        counts.extend(values)
        indptr.append(len(indices))
    n_words = max(indices) + 1 if indices else 0
    return sp.csr_matrix(
        (np.asarray(counts, np.float32), np.asarray(indices), np.asarray(indptr)),
        shape=(len(indptr) - 1, n_words),
    )


#: MovieLens 1M's age groups (its users.dat codes), used for ml-100k's exact ages too.
AGE_GROUPS = [(1, "under 18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+")]


def _age_group(age: int) -> int:
    return max(i for i, (start, _) in enumerate(AGE_GROUPS) if age >= start or i == 0)


def _user_blocks(rows: list[tuple[int, str, str]], occupations: list[str]) -> tuple[dict, dict]:
    """One-hot blocks "age", "gender", "occupation" from (age group, gender, occupation) per user."""
    n = len(rows)
    genders = sorted({g for _, g, _ in rows})
    column = {o: i for i, o in enumerate(occupations)}

    def one_hot(values: list[int], width: int) -> sp.csr_matrix:
        return sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), values)), shape=(n, width))

    blocks = {
        "age": one_hot([a for a, _, _ in rows], len(AGE_GROUPS)),
        "gender": one_hot([genders.index(g) for _, g, _ in rows], len(genders)),
        "occupation": one_hot([column[o] for _, _, o in rows], len(occupations)),
    }
    names = {"age": [name for _, name in AGE_GROUPS], "gender": genders, "occupation": occupations}
    return blocks, names


def load_movielens_100k(path: str | os.PathLike | None = None, min_rating: float = 4.0) -> Dataset:
    """MovieLens 100K: ratings >= ``min_rating`` are positives; 19 genre flags as item
    features; age group, gender and occupation (u.user) as user features."""
    folder = _folder(path, "ml-100k")
    users, items, ratings = [], [], []
    for number, text in _lines(folder / "u.data"):
        parts = text.split("\t")
        if len(parts) < 3:
            raise ValueError(f"{folder / 'u.data'}:{number}: expected 'user<TAB>item<TAB>rating', got {text!r}")
        try:
            users.append(int(parts[0]))
            items.append(int(parts[1]))
            ratings.append(float(parts[2]))
        except ValueError:
            raise ValueError(f"{folder / 'u.data'}:{number}: non-numeric field in {text!r}") from None
    genre_names = [line.split("|")[0] for _, line in _lines(folder / "u.genre") if line]
    item_rows: dict[int, tuple[str, list[int]]] = {}
    for number, text in _lines(folder / "u.item", encoding="latin-1"):
        if not text:
            continue
        parts = text.split("|")
        if len(parts) < 5 + len(genre_names):
            raise ValueError(f"{folder / 'u.item'}:{number}: expected {5 + len(genre_names)} '|' fields")
        item_rows[int(parts[0])] = (parts[1], [int(f) for f in parts[5 : 5 + len(genre_names)]])
    n_users, n_items = max(users), max(max(items), max(item_rows))
    keep = np.asarray(ratings) >= min_rating
    user_items = _binary(np.asarray(users)[keep] - 1, np.asarray(items)[keep] - 1, (n_users, n_items))
    flags = np.zeros((n_items, len(genre_names)), dtype=np.float32)
    titles = np.full(n_items, "", dtype=object)
    for movie, (title, genre_flags) in item_rows.items():
        flags[movie - 1] = genre_flags
        titles[movie - 1] = title
    genres = sp.csr_matrix(flags)
    user_blocks, user_names = {}, {}
    if (folder / "u.user").exists():
        occupations = [text.strip() for _, text in _lines(folder / "u.occupation") if text.strip()]
        people: dict[int, tuple[int, str, str]] = {}
        for number, text in _lines(folder / "u.user"):
            if not text:
                continue
            parts = text.split("|")
            try:
                people[int(parts[0])] = (_age_group(int(parts[1])), parts[2], parts[3])
            except (ValueError, IndexError):
                raise ValueError(f"{folder / 'u.user'}:{number}: expected 'id|age|gender|occupation|zip'") from None
            if parts[3] not in occupations:
                raise ValueError(f"{folder / 'u.user'}:{number}: occupation {parts[3]!r} is not in u.occupation")
        missing = [u for u in range(1, n_users + 1) if u not in people]
        if missing:
            raise ValueError(f"{folder / 'u.user'}: user {missing[0]} is not described")
        user_blocks, user_names = _user_blocks([people[u] for u in range(1, n_users + 1)], occupations)
    return Dataset(
        name="ml-100k",
        user_items=user_items,
        item_features={"genres": genres},
        feature_names={"genres": genre_names},
        user_features=user_blocks,
        user_feature_names=user_names,
        user_ids=np.arange(1, n_users + 1),
        item_ids=np.arange(1, n_items + 1),
        item_labels=_first_feature_labels(genres, genre_names),
        item_label_kind="first genre",
        item_titles=titles.astype(str),
    )


def _first_feature_labels(features: sp.csr_matrix, names: list[str]) -> np.ndarray:
    labels = np.full(features.shape[0], "none", dtype=object)
    for item in range(features.shape[0]):
        cols = features.indices[features.indptr[item] : features.indptr[item + 1]]
        if len(cols):
            labels[item] = names[int(cols.min())]
    return labels.astype(str)


def _user_line_file(path: Path, n_users: int | None = None, n_items: int | None = None) -> sp.csr_matrix:
    """``user item item ...`` lines (LightGCN format) as a CSR matrix."""
    users, items = [], []
    for number, text in _lines(path):
        if not text.strip():
            continue
        values = _ints(path, number, text)
        users.extend([values[0]] * (len(values) - 1))
        items.extend(values[1:])
    rows, cols = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or cols.min() < 0):
        raise ValueError(f"{path}: negative ids")
    shape = (
        n_users if n_users is not None else int(rows.max(initial=-1)) + 1,
        n_items if n_items is not None else int(cols.max(initial=-1)) + 1,
    )
    if len(rows) and (rows.max() >= shape[0] or cols.max() >= shape[1]):
        raise ValueError(f"{path}: ids beyond the {shape[0]} users / {shape[1]} items listed")
    return _binary(rows, cols, shape)


def _id_map(path: Path, header: bool) -> np.ndarray:
    """Original ids indexed by remapped id, from ``org_id remap_id ...`` lines."""
    pairs = []
    for number, text in _lines(path):
        if (header and number == 1) or not text.strip():
            continue
        tokens = text.split()
        if len(tokens) < 2:
            raise ValueError(f"{path}:{number}: expected 'original_id remapped_id', got {text!r}")
        pairs.append((int(tokens[1]), tokens[0]))
    ids = np.empty(len(pairs), dtype=object)
    for remap, original in pairs:
        if remap >= len(pairs):
            raise ValueError(f"{path}: remapped id {remap} is beyond the {len(pairs)} listed")
        ids[remap] = original
    return ids


def _split_from_parts(parts: list[sp.csr_matrix], seed_note: str) -> Split:
    train, validation, test = parts
    return Split(train=train, validation=validation, test=test, seed=-1, note=seed_note)


def load_movielens_1m_implicit(path: str | os.PathLike | None = None) -> Dataset:
    """MovieLens 1M, ratings >= 4 (KGRec's 80/20 split ships with it); 18 genres as features.

    ``user_items`` is train + test (all positives); ``given_split`` holds the
    shipped split, with an empty validation part.
    """
    folder = _folder(path, "ml-1m-implicit")
    user_ids = _id_map(folder / "user_list.txt", header=False)
    item_ids = _id_map(folder / "item_list.txt", header=False)
    train = _user_line_file(folder / "train.txt", len(user_ids), len(item_ids))
    test = _user_line_file(folder / "test.txt", len(user_ids), len(item_ids))
    movie_genres: dict[str, tuple[str, list[str]]] = {}
    for number, text in _lines(folder / "movies.dat", encoding="latin-1"):
        if not text:
            continue
        parts = text.split("::")
        if len(parts) != 3:
            raise ValueError(f"{folder / 'movies.dat'}:{number}: expected 'id::title::genres', got {text!r}")
        movie_genres[parts[0]] = (parts[1], parts[2].split("|"))
    genre_names = sorted({g for _, genres in movie_genres.values() for g in genres})
    column = {g: i for i, g in enumerate(genre_names)}
    rows, cols = [], []
    titles = np.full(len(item_ids), "", dtype=object)
    for item, movie in enumerate(item_ids):
        title, genres = movie_genres.get(str(movie), ("", []))
        titles[item] = title
        rows.extend([item] * len(genres))
        cols.extend(column[g] for g in genres)
    genres = _binary(np.asarray(rows), np.asarray(cols), (len(item_ids), len(genre_names)))
    empty = sp.csr_matrix(train.shape, dtype=np.float32)
    user_blocks, user_names = {}, {}
    if (folder / "users.dat").exists():
        codes = {start: i for i, (start, _) in enumerate(AGE_GROUPS)}
        people = {}
        for number, text in _lines(folder / "users.dat", encoding="latin-1"):
            if not text:
                continue
            parts = text.split("::")
            if len(parts) < 4 or not parts[2].isdigit() or int(parts[2]) not in codes:
                raise ValueError(f"{folder / 'users.dat'}:{number}: expected 'id::gender::age::occupation::zip'")
            people[parts[0]] = (codes[int(parts[2])], parts[1], parts[3])
        occupations = sorted({o for _, _, o in people.values()}, key=lambda o: (len(o), o))
        described = [people.get(str(u)) for u in user_ids]
        if all(d is not None for d in described):
            user_blocks, user_names = _user_blocks(described, occupations)
    return Dataset(
        name="ml-1m-implicit",
        user_items=(train + test).tocsr(),
        item_features={"genres": genres},
        feature_names={"genres": genre_names},
        user_features=user_blocks,
        user_feature_names=user_names,
        user_ids=user_ids,
        item_ids=item_ids,
        item_labels=_first_feature_labels(genres, genre_names),
        item_label_kind="first genre",
        item_titles=titles.astype(str),
        given_split=_split_from_parts([train, empty, test], "shipped with the data (KGRec, 80/20)"),
    )


def load_movielens_latest_small(path: str | os.PathLike | None = None, min_rating: float = 4.0) -> Dataset:
    """MovieLens latest-small: ratings >= ``min_rating``; genres and user tags as features."""
    folder = _folder(path, "ml-latest-small")
    ratings = _read_csv(folder / "ratings.csv", ["userId", "movieId", "rating"])
    movies = _read_csv(folder / "movies.csv", ["movieId", "title", "genres"])
    tags = _read_csv(folder / "tags.csv", ["movieId", "tag"]) if (folder / "tags.csv").exists() else []
    movie_index = {row[0]: i for i, row in enumerate(movies)}
    user_values = sorted({int(r[0]) for r in ratings})
    user_index = {u: i for i, u in enumerate(user_values)}
    rows, cols = [], []
    for number, (user, movie, rating) in enumerate(ratings, start=2):
        if movie not in movie_index:
            raise ValueError(f"{folder / 'ratings.csv'}:{number}: movie {movie} is not in movies.csv")
        if float(rating) >= min_rating:
            rows.append(user_index[int(user)])
            cols.append(movie_index[movie])
    user_items = _binary(np.asarray(rows), np.asarray(cols), (len(user_values), len(movies)))
    genre_names = sorted({g for _, _, gs in movies for g in gs.split("|")})
    genre_col = {g: i for i, g in enumerate(genre_names)}
    g_rows = [i for i, (_, _, gs) in enumerate(movies) for _ in gs.split("|")]
    g_cols = [genre_col[g] for _, _, gs in movies for g in gs.split("|")]
    genres = _binary(np.asarray(g_rows), np.asarray(g_cols), (len(movies), len(genre_names)))
    tag_names = sorted({t.strip().lower() for _, t in tags})
    tag_col = {t: i for i, t in enumerate(tag_names)}
    t_pairs = [(movie_index[m], tag_col[t.strip().lower()]) for m, t in tags if m in movie_index]
    tag_matrix = _binary(
        np.asarray([p[0] for p in t_pairs], dtype=np.int64),
        np.asarray([p[1] for p in t_pairs], dtype=np.int64),
        (len(movies), len(tag_names)),
    )
    return Dataset(
        name="ml-latest-small",
        user_items=user_items,
        item_features={"genres": genres, "tags": tag_matrix},
        feature_names={"genres": genre_names, "tags": tag_names},
        user_ids=np.asarray(user_values),
        item_ids=np.asarray([int(m) for m, _, _ in movies]),
        item_labels=_first_feature_labels(genres, genre_names),
        item_label_kind="first genre",
        item_titles=np.asarray([t for _, t, _ in movies], dtype=str),
    )


def _read_csv(path: Path, columns: list[str]) -> list[tuple[str, ...]]:
    """The named columns of a CSV file with a header row."""
    with open(_require(path), encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty")
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {missing}; it has {header}")
        where = [header.index(c) for c in columns]
        rows = []
        for number, row in enumerate(reader, start=2):
            if len(row) < len(header):
                raise ValueError(f"{path}:{number}: expected {len(header)} fields, got {len(row)}")
            rows.append(tuple(row[i] for i in where))
        return rows


def load_gowalla(path: str | os.PathLike | None = None) -> Dataset:
    """Gowalla check-ins (LightGCN/NGCF 10-core split): train/valid/test as shipped."""
    folder = _folder(path, "gowalla")
    user_ids = _id_map(folder / "user_list.txt", header=True)
    item_ids = _id_map(folder / "item_list.txt", header=True)
    parts = [_user_line_file(folder / f, len(user_ids), len(item_ids)) for f in ("train.txt", "valid.txt", "test.txt")]
    return Dataset(
        name="gowalla",
        user_items=(parts[0] + parts[1] + parts[2]).tocsr(),
        user_ids=user_ids,
        item_ids=item_ids,
        given_split=_split_from_parts(parts, "shipped with the data (LightGCN test; LightGCN++ valid)"),
    )


def load_interactions(
    path: str | os.PathLike,
    sep: str | None = None,
    user_column: int | str = 0,
    item_column: int | str = 1,
    value_column: int | str | None = None,
    min_value: float | None = None,
    header: bool | None = None,
) -> Dataset:
    """Any CSV/TSV of ``user, item[, value]`` rows, with ids of any kind.

    Parameters
    ----------
    sep : str, optional
        Field separator; guessed from the first line (tab, comma, ';', '::' or spaces).
    user_column, item_column, value_column : int or str
        Column positions, or names when the file has a header.
    min_value : float, optional
        Keep rows whose value is at least this (e.g. 4 for star ratings).
    header : bool, optional
        Whether the first line names the columns; guessed when None.
    """
    path = Path(path)
    # utf-8-sig: a byte-order mark is not part of the first user's id.
    text = _require(path).read_text(encoding="utf-8-sig", errors="replace")
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path}: the file holds no interactions")
    first = lines[0]
    if sep is None:
        sep = next((s for s in ("\t", "::", ",", ";") if s in first), None)

    def split(line: str, number: int) -> list[str]:
        try:
            if sep == ",":
                return [f.strip() for f in next(csv.reader(io.StringIO(line)))]  # quoted fields
            return [f.strip() for f in (line.split() if sep is None else line.split(sep))]
        except (csv.Error, StopIteration) as error:
            raise ValueError(f"{path}:{number}: {error}") from None

    names = split(first, 1)
    named = any(isinstance(c, str) for c in (user_column, item_column, value_column) if c is not None)
    position = {
        key: _position(col, names, path) if col is not None else None
        for key, col in (("user", user_column), ("item", item_column), ("value", value_column))
    }
    if header is None:
        header = named or _looks_like_header(names, [split(line, n) for n, line in enumerate(lines[1:21], 2)], position)
    separator = {"\t": "tab", None: "spaces"}.get(sep, repr(sep))
    note = f"separator {separator}; " + (f"header {first[:60]!r} skipped" if header else "no header line")
    user_map: dict[str, int] = {}
    item_map: dict[str, int] = {}
    rows, cols, values = [], [], []
    needed = max(p for p in position.values() if p is not None)
    for number, line in enumerate(lines, start=1):
        if (header and number == 1) or not line.strip():
            continue
        fields = split(line, number)
        if len(fields) <= needed:
            raise ValueError(
                f"{path}:{number}: expected at least {needed + 1} fields, got {len(fields)}: {line[:80]!r}"
            )
        value = 1.0
        if position["value"] is not None:
            try:
                value = float(fields[position["value"]])
            except ValueError:
                raise ValueError(f"{path}:{number}: value {fields[position['value']]!r} is not a number") from None
            if not np.isfinite(value):
                raise ValueError(f"{path}:{number}: value {fields[position['value']]!r} is not a finite number")
            if min_value is not None and value < min_value:
                continue
        rows.append(user_map.setdefault(fields[position["user"]], len(user_map)))
        cols.append(item_map.setdefault(fields[position["item"]], len(item_map)))
        values.append(value)
    if not rows:
        raise ValueError(f"{path}: no interaction passed the filters")
    matrix = sp.csr_matrix((np.asarray(values, np.float32), (rows, cols)), shape=(len(user_map), len(item_map)))
    matrix.sum_duplicates()
    return Dataset(
        name=path.stem,
        user_items=matrix,
        user_ids=np.asarray(list(user_map), dtype=object),
        item_ids=np.asarray(list(item_map), dtype=object),
        note=note,
    )


#: Column names that mark a first line as a header.
HEADER_WORDS = frozenset(
    "user users user_id userid uid item items item_id itemid iid movie movieid movie_id track artist song "
    "product rating ratings value values count counts plays playcount play_count weight score timestamp".split()
)


def _looks_like_header(first: list[str], following: list[list[str]], position: dict[str, int | None]) -> bool:
    """Whether the first line names columns: a user/item/value field is a usual column
    name, or is not a number while that column is numeric on the lines after it."""
    for column in (p for p in position.values() if p is not None):
        if column >= len(first):
            continue
        if first[column].strip().lower() in HEADER_WORDS:
            return True
        below = [fields[column] for fields in following if column < len(fields)]
        if below and not _is_number(first[column]) and all(_is_number(v) for v in below):
            return True
    return False


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _position(column: int | str, names: list[str], path: Path) -> int:
    if isinstance(column, str):
        if column not in names:
            raise ValueError(f"{path}:1: no column named {column!r}; the header has {names}")
        return names.index(column)
    return int(column)


# --------------------------------------------------------------------------- synthetic data


def synthetic(
    n_users: int = 20_000,
    n_items: int = 10_000,
    n_interactions: int = 400_000,
    n_clusters: int = 50,
    in_cluster: float = 0.8,
    popularity_exponent: float = 0.8,
    seed: int = 0,
    chunk_users: int = 100_000,
) -> Dataset:
    """A seeded implicit-feedback data set with planted structure.

    Items belong to ``n_clusters`` clusters and have Zipf popularity
    (exponent ``popularity_exponent``); each user belongs to one cluster and has
    a heavy-tailed (log-normal) activity. A user's items come from its own
    cluster with probability ``in_cluster`` and from the whole catalogue
    otherwise, each by popularity. Users are generated ``chunk_users`` at a
    time, so 1M users x 300k items x 10M interactions fits in a few hundred MB.
    Repeated draws count once and are redrawn, so the matrix holds about
    ``n_interactions`` distinct entries. ``item_labels`` holds each item's cluster.
    """
    rng = np.random.default_rng(seed)
    item_cluster = rng.integers(0, n_clusters, n_items)
    popularity = 1.0 / np.power(rng.permutation(n_items) + 1.0, popularity_exponent)
    by_cluster = np.argsort(item_cluster, kind="stable")
    cum_within = np.cumsum(popularity[by_cluster])
    cluster_end = np.searchsorted(item_cluster[by_cluster], np.arange(n_clusters), side="right")
    cluster_lo = np.concatenate([[0.0], cum_within[cluster_end[:-1] - 1]])
    cluster_hi = cum_within[cluster_end - 1]
    cluster_lo[np.diff(np.concatenate([[0], cluster_end])) == 0] = np.nan  # empty clusters
    global_cum = np.cumsum(popularity)

    user_cluster = rng.integers(0, n_clusters, n_users)
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    counts = np.maximum(1, np.round(activity / activity.sum() * n_interactions)).astype(np.int64)
    counts = np.minimum(counts, n_items // 2)

    def draw(owners: np.ndarray) -> np.ndarray:
        """One item per entry of ``owners``: in-cluster or global, by popularity."""
        clusters = user_cluster[owners]
        local = rng.uniform(size=len(owners))
        lo, hi = cluster_lo[clusters], cluster_hi[clusters]
        inside = (rng.uniform(size=len(owners)) < in_cluster) & ~np.isnan(lo)
        items = np.empty(len(owners), dtype=np.int64)
        targets = lo[inside] + local[inside] * (hi[inside] - lo[inside])
        items[inside] = by_cluster[np.searchsorted(cum_within, targets, side="right").clip(0, n_items - 1)]
        outside = ~inside
        global_targets = local[outside] * global_cum[-1]
        items[outside] = np.searchsorted(global_cum, global_targets, side="right").clip(0, n_items - 1)
        return items

    indptr_parts, index_parts = [np.zeros(1, np.int64)], []
    offset = 0
    for start in range(0, n_users, chunk_users):
        stop = min(start + chunk_users, n_users)
        wanted = counts[start:stop]
        chunk = sp.csr_matrix((stop - start, n_items), dtype=np.float32)
        # Repeated draws count once; draw again for the shortfall a few times.
        for _ in range(8):
            missing = wanted - np.diff(chunk.indptr)
            if missing.sum() <= 0.001 * wanted.sum():
                break
            owners = np.repeat(np.arange(start, stop), np.maximum(missing, 0))
            extra = _binary(owners - start, draw(owners), chunk.shape)
            chunk = (chunk + extra).tocsr()
            chunk.data[:] = 1.0
        indptr_parts.append(chunk.indptr[1:].astype(np.int64) + offset)
        index_parts.append(chunk.indices)
        offset += chunk.nnz
    indptr = np.concatenate(indptr_parts)
    indices = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int32)
    matrix = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n_users, n_items))
    return Dataset(
        name=f"synthetic-{n_users}x{n_items}-seed{seed}",
        user_items=matrix,
        user_ids=np.arange(n_users),
        item_ids=np.arange(n_items),
        item_labels=np.asarray([f"cluster {c}" for c in item_cluster]),
        item_label_kind="planted cluster",
    )


# --------------------------------------------------------------------------- dispatch

DATASETS: dict[str, Callable[..., Dataset]] = {
    "citeulike-t": load_citeulike,
    "ml-100k": load_movielens_100k,
    "ml-1m-implicit": load_movielens_1m_implicit,
    "ml-latest-small": load_movielens_latest_small,
    "gowalla": load_gowalla,
}


def load(name_or_path: str | os.PathLike, **options: Any) -> Dataset:
    """A data set by name (``citeulike-t``, ``ml-100k``, ``ml-1m-implicit``,
    ``ml-latest-small``, ``gowalla``, ``synthetic``), by folder of one of those,
    or from an interaction file (:func:`load_interactions`)."""
    key = str(name_or_path)
    if key in DATASETS:
        return DATASETS[key](**options)
    if key == "synthetic":
        return synthetic(**options)
    path = Path(name_or_path)
    if path.is_dir():
        if path.name in DATASETS:
            return DATASETS[path.name](path, **options)
        raise ValueError(f"{path} is a folder but not one of the known data sets {sorted(DATASETS)}")
    if path.is_file():
        return load_interactions(path, **options)
    known = ", ".join([*DATASETS, "synthetic"])
    raise FileNotFoundError(f"{key!r} is neither a known data set ({known}) nor an existing file or folder")


# --------------------------------------------------------------------------- the paper's split


@dataclass
class Split:
    """Train / validation / test parts of one user x item matrix (disjoint, same shape)."""

    train: sp.csr_matrix
    validation: sp.csr_matrix
    test: sp.csr_matrix
    seed: int
    note: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return self.train.shape

    def fingerprint(self) -> str:
        """A hash of the three parts, to check two runs scored the same split."""
        digest = hashlib.sha256()
        for part in (self.train, self.validation, self.test):
            part = part.tocsr()
            part.sort_indices()
            digest.update(np.asarray(part.shape, np.int64).tobytes())
            digest.update(part.indptr.astype(np.int64).tobytes())
            digest.update(part.indices.astype(np.int64).tobytes())
            if not _is_binary(part):  # binary parts hash as they did before values were kept
                digest.update(part.data.astype(np.float32).tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the split to ``path`` (.npz, no pickle), atomically."""
        arrays: dict[str, np.ndarray] = {}
        for name in ("train", "validation", "test"):
            part = getattr(self, name).tocsr()
            arrays[f"{name}_indptr"] = part.indptr.astype(np.int64)
            arrays[f"{name}_indices"] = part.indices.astype(np.int32)
            if not _is_binary(part):
                arrays[f"{name}_data"] = part.data.astype(np.float32)
        meta = {
            "format": SPLIT_FORMAT,
            # A binary split is written as version 1, which older releases read too.
            "version": SPLIT_VERSION if any(name.endswith("_data") for name in arrays) else 1,
            "shape": list(self.shape),
            "seed": self.seed,
            "note": self.note,
            "fingerprint": self.fingerprint(),
        }
        save_npz(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        """Reads a split written by :meth:`save`; a damaged file raises ValueError."""
        with open_npz(path, SPLIT_FORMAT, SPLIT_VERSION) as reader:
            meta, name = reader.meta, reader.name
            shape = meta.get("shape")
            if not (
                isinstance(shape, list)
                and len(shape) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 for n in shape)
            ):
                raise ValueError(f"{name}: its shape {shape!r} is not (users, items); the file is damaged")
            seed = meta_int(meta, "seed", name, minimum=-1)
            fingerprint, note = meta.get("fingerprint"), meta.get("note", "")
            if not isinstance(fingerprint, str) or not isinstance(note, str):
                raise ValueError(f"{name}: its fingerprint or note is not text; the file is damaged")
            parts = []
            for part in ("train", "validation", "test"):
                indptr = reader.array(f"{part}_indptr", (shape[0] + 1,), np.int64)
                nnz = int(indptr[-1]) if len(indptr) else 0
                if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or nnz > shape[0] * shape[1]:
                    raise ValueError(f"{name}: the {part} part's offsets are impossible; the file is damaged")
                indices = reader.array(f"{part}_indices", (nnz,), np.int32)
                if nnz and (indices.min() < 0 or indices.max() >= shape[1]):
                    raise ValueError(f"{name}: the {part} part names items outside {shape}; the file is damaged")
                values = np.ones(nnz, np.float32)
                if reader.has(f"{part}_data"):
                    values = reader.array(f"{part}_data", (nnz,), np.float32)
                    if not np.all(np.isfinite(values)):
                        raise ValueError(
                            f"{name}: the {part} part holds values that are not finite; the file is damaged"
                        )
                parts.append(sp.csr_matrix((values, indices, indptr), shape=tuple(shape)))
        split = cls(*parts, seed=int(seed), note=note)
        if split.fingerprint() != fingerprint:
            raise ValueError(f"{name}: the split does not match its recorded fingerprint; the file is damaged")
        return split


@dataclass
class ColdStartSplit:
    """Item cold start: ``cold_items`` have no interaction in ``train`` (their columns are
    empty); ``test`` holds every interaction with them, to be found among them."""

    train: sp.csr_matrix
    test: sp.csr_matrix
    cold_items: np.ndarray
    seed: int


def split_cold_items(user_items: Any, fraction: float = 0.2, seed: int = 0) -> ColdStartSplit:
    """Holds out ``fraction`` of the items entirely (seeded): the item cold-start protocol.

    A model trains on ``train`` (the other items), gets the cold items' vectors
    from their features only, and is scored by ranking the cold items for the
    users who interacted with them (``ranking_metrics_at_k(..., items=split.cold_items)``).
    Values (confidence weights) are kept in both parts, as :func:`split_paper` keeps them.
    """
    matrix = _interactions(user_items)
    if not (isinstance(fraction, numbers.Real) and 0 < fraction < 1):
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
    n_items = matrix.shape[1]
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(n_items, max(1, round(fraction * n_items)), replace=False))
    is_cold = np.zeros(n_items, dtype=np.float32)
    is_cold[cold] = 1.0
    train = _dropped_zeros(matrix @ sp.diags(1.0 - is_cold))
    test = _dropped_zeros(matrix @ sp.diags(is_cold))
    return ColdStartSplit(train=train, test=test, cold_items=cold, seed=seed)


def _interactions(user_items: Any) -> sp.csr_matrix:
    """``user_items`` as float32 CSR with duplicates summed and stored zeros dropped (they
    are not interactions); refuses a matrix with none."""
    matrix = as_csr(user_items, "user_items").astype(np.float32)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    if matrix.nnz == 0:
        raise ValueError("user_items holds no interactions; there is nothing to split")
    return matrix


def _dropped_zeros(matrix: sp.spmatrix) -> sp.csr_matrix:
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    matrix.eliminate_zeros()
    return matrix


@dataclass
class FoldInSplit:
    """User fold-in: ``users`` are absent from ``train``; ``fold`` holds the half of each
    one's items it is folded in from, ``test`` the other half."""

    train: sp.csr_matrix
    fold: sp.csr_matrix
    test: sp.csr_matrix
    users: np.ndarray
    seed: int


def split_fold_in_users(user_items: Any, fraction: float = 0.1, seed: int = 0, min_items: int = 4) -> FoldInSplit:
    """Holds out ``fraction`` of the users with at least ``min_items`` items (seeded): each
    one's items are shuffled, half go to ``fold`` and half to ``test``; ``train`` keeps
    everyone else. ``fold`` and ``test`` have one row per held-out user, in ``users`` order.
    Values (confidence weights) are kept in every part, as :func:`split_paper` keeps them."""
    matrix = _interactions(user_items)
    if not (isinstance(fraction, numbers.Real) and 0 < fraction < 1):
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(np.diff(matrix.indptr) >= min_items)
    if len(eligible) == 0:
        raise ValueError(f"no user has {min_items} items or more to fold in")
    users = np.sort(rng.choice(eligible, max(1, round(fraction * len(eligible))), replace=False))
    held = np.zeros(matrix.shape[0], dtype=bool)
    held[users] = True
    keep = _dropped_zeros(sp.diags((~held).astype(np.float32)) @ matrix)
    fold_rows, test_rows = [], []
    for user in users:
        entries = np.arange(matrix.indptr[user], matrix.indptr[user + 1])
        shuffled = rng.permutation(matrix.indices[entries])  # the draws of the binary version
        half = len(shuffled) // 2
        in_fold = np.isin(matrix.indices[entries], shuffled[:half])
        fold_rows.append(entries[in_fold])
        test_rows.append(entries[~in_fold])

    def rows(parts: list[np.ndarray]) -> sp.csr_matrix:
        indptr = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
        entries = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        shape = (len(parts), matrix.shape[1])
        return sp.csr_matrix((matrix.data[entries], matrix.indices[entries], indptr), shape=shape)

    return FoldInSplit(train=keep, fold=rows(fold_rows), test=rows(test_rows), users=users, seed=seed)


def split_paper(
    user_items: Any,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    min_items: int = 5,
) -> Split:
    """The paper's per-user split (Hsieh et al. 2017).

    Each user's items are shuffled with ``seed``; ``floor(0.2 n)`` go to
    validation, ``floor(0.2 n)`` to test, and the rest, rounding remainder
    included, to train. Users with fewer than ``min_items`` items go entirely
    to train. Deterministic for a seed; O(nnz log nnz), vectorised. The values
    of ``user_items`` (play counts, ratings: confidence weights for ``CML``) are
    kept in every part; explicitly stored zeros are not interactions.
    """
    matrix = as_csr(user_items, "user_items").astype(np.float32)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    if matrix.nnz == 0:
        raise ValueError("user_items holds no interactions; there is nothing to split")
    if (
        len(fractions) != 3
        or not all(isinstance(f, numbers.Real) and np.isfinite(f) and 0 <= f <= 1 for f in fractions)
        or abs(sum(fractions) - 1.0) > 1e-9
    ):
        raise ValueError(f"fractions must be three numbers in [0, 1] summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    n_rows = matrix.shape[0]
    lengths = np.diff(matrix.indptr)
    rows = np.repeat(np.arange(n_rows), lengths)
    order = np.lexsort((rng.random(matrix.nnz), rows))  # shuffle within each user
    position = np.empty(matrix.nnz, dtype=np.int64)
    position[order] = np.arange(matrix.nnz) - matrix.indptr[rows[order]]
    n = lengths[rows]
    n_validation = np.floor(fractions[1] * n + 1e-9).astype(np.int64)
    n_test = np.floor(fractions[2] * n + 1e-9).astype(np.int64)
    small = n < min_items
    n_validation[small] = 0
    n_test[small] = 0
    n_train = n - n_validation - n_test
    part = np.where(position < n_train, 0, np.where(position < n_train + n_validation, 1, 2))
    coo = matrix.tocoo()
    # tocoo keeps CSR order, which `rows` and `position` follow.
    pieces = [
        sp.csr_matrix((coo.data[part == p], (coo.row[part == p], coo.col[part == p])), shape=matrix.shape)
        for p in range(3)
    ]
    return Split(
        *pieces,
        seed=seed,
        note=f"split_paper(seed={seed}, fractions={tuple(fractions)}, min_items={min_items})",
    )
