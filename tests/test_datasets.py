"""Loaders, the synthetic generator and the paper split."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import scipy.sparse as sp
import tiny_data
from conftest import data_path, random_interactions

from cml_rs import datasets


def test_citeulike_strips_the_leading_count():
    folder = data_path("citeulike-t")
    data = datasets.load_citeulike(folder)
    assert data.user_items.shape == (7947, 25975)
    assert data.user_items.nnz == 134860
    # Line 1 of users.dat is "4 193 11908 12727 14760": four items, not five.
    assert data.user_items[0].indices.tolist() == [193, 11908, 12727, 14760]
    assert data.item_features["tags"].shape == (25975, 4222)
    assert data.item_features["words"].shape == (25975, 20000)
    assert data.item_features["words"].nnz == 490708
    assert len(data.item_labels) == 25975


def test_other_bundled_datasets_match_their_provenance():
    ml100k = datasets.load_movielens_100k(data_path("ml-100k"))
    assert ml100k.user_items.shape == (943, 1682) and ml100k.user_items.nnz == 55375
    assert ml100k.item_features["genres"].shape == (1682, 19)
    ml1m = datasets.load_movielens_1m_implicit(data_path("ml-1m-implicit"))
    assert ml1m.user_items.nnz == 575280
    assert ml1m.given_split.train.nnz == 457818 and ml1m.given_split.test.nnz == 117462
    small = datasets.load_movielens_latest_small(data_path("ml-latest-small"))
    assert small.user_items.nnz == 48580 and small.item_features["tags"].shape[1] == 1475
    gowalla = datasets.load_gowalla(data_path("gowalla"))
    assert gowalla.user_items.shape == (29858, 40981)
    parts = gowalla.given_split
    assert (parts.train.nnz, parts.validation.nnz, parts.test.nnz) == (719081, 91047, 217242)


def test_citeulike_format_on_a_tiny_copy(tmp_path):
    data = datasets.load_citeulike(tiny_data.citeulike(tmp_path), min_tag_items=2)
    assert data.user_items.toarray().tolist() == [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 1]]
    # Tags on at least 2 articles: ml (0, 2, 3) and stats (0, 3); bio is dropped.
    assert data.feature_names["tags"] == ["ml", "stats"]
    assert data.item_features["tags"].toarray().tolist() == [[1, 1], [0, 0], [1, 0], [1, 1]]
    words = data.item_features["words"].toarray()
    assert words.tolist() == [[1, 0, 3], [0, 2, 0], [0, 0, 0], [4, 0, 1]]
    assert data.feature_names["words"] == ["model", "cell", "rank"]
    assert data.item_labels.tolist() == ["ml", "none", "ml", "ml"]


def test_movielens_100k_format_on_a_tiny_copy(tmp_path):
    data = datasets.load_movielens_100k(tiny_data.movielens_100k(tmp_path))
    assert data.user_items.toarray().tolist() == [[1, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert data.feature_names["genres"] == ["unknown", "Action", "Comedy", "Drama"]
    assert data.item_features["genres"].toarray().tolist() == [[0, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 1]]
    assert data.item_titles.tolist() == ["Toy Story (1995)", "Heat (1995)", "Caf\xe9 (1996)"]
    assert data.item_labels.tolist() == ["Comedy", "Action", "Drama"]
    assert data.user_ids.tolist() == [1, 2, 3] and data.item_ids.tolist() == [1, 2, 3]


def test_movielens_1m_implicit_format_on_a_tiny_copy(tmp_path):
    data = datasets.load_movielens_1m_implicit(tiny_data.movielens_1m_implicit(tmp_path))
    split = data.given_split
    assert split.train.toarray().tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    assert split.test.toarray().tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    assert split.validation.nnz == 0
    assert (data.user_items != split.train + split.test).nnz == 0
    assert data.item_ids.tolist() == ["10", "20", "30", "40"]
    assert data.item_titles.tolist() == ["Alien (1979)", "Heat (1995)", "Up (2009)", ""]
    assert data.feature_names["genres"] == ["Action", "Comedy", "Horror", "Sci-Fi"]
    assert data.item_features["genres"].toarray().tolist() == [[0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_movielens_latest_small_format_on_a_tiny_copy(tmp_path):
    data = datasets.load_movielens_latest_small(tiny_data.movielens_latest_small(tmp_path))
    # Users 1, 5, 9 and movies 1, 3, 7 in file order; ratings >= 4 kept.
    assert data.user_items.toarray().tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert data.user_ids.tolist() == [1, 5, 9] and data.item_ids.tolist() == [1, 3, 7]
    assert data.item_titles.tolist() == ["Toy Story (1995)", "Good, Bad (1966)", "Heat (1995)"]
    assert data.feature_names["genres"] == ["Action", "Animation", "Comedy", "Crime", "Western"]
    # Tags are lower-cased and stripped, so "Pixar" and "pixar " are one tag.
    assert data.feature_names["tags"] == ["heist", "pixar"]
    assert data.item_features["tags"].toarray().tolist() == [[0, 1], [0, 0], [1, 0]]


def test_gowalla_format_on_a_tiny_copy(tmp_path):
    data = datasets.load_gowalla(tiny_data.gowalla(tmp_path))
    parts = data.given_split
    assert parts.train.toarray().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]]
    assert parts.validation.toarray().tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert parts.test.toarray().tolist() == [[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]]
    assert data.user_ids.tolist() == ["343", "5258", "77"] and data.item_ids.tolist() == ["8975", "9190", "12", "40"]


def test_load_finds_tiny_copies_by_name_through_cml_data(tmp_path, monkeypatch):
    for writer in (tiny_data.citeulike, tiny_data.gowalla):
        writer(tmp_path)
    monkeypatch.setenv("CML_DATA", str(tmp_path))
    assert datasets.load("gowalla").n_items == 4
    assert datasets.load(tmp_path / "citeulike-t").n_users == 3


def test_load_by_name_and_unknown_names():
    assert datasets.load("synthetic", n_users=50, n_items=30, n_interactions=300).n_users == 50
    with pytest.raises(FileNotFoundError, match="neither a known data set"):
        datasets.load("no-such-dataset")


def test_missing_file_is_named(tmp_path):
    (tmp_path / "citeulike-t").mkdir()
    with pytest.raises(FileNotFoundError, match=r"mult\.dat"):
        datasets.load_citeulike(tmp_path / "citeulike-t")


def test_malformed_lines_name_file_and_line(tmp_path):
    folder = tmp_path / "citeulike-t"
    folder.mkdir()
    (folder / "mult.dat").write_text("1 0:1\n1 1:1\n1 2:1\n")
    (folder / "users.dat").write_text("2 0 1\n3 0 2\n")
    with pytest.raises(ValueError, match=r"users\.dat:2: the line starts with count 3 but lists 2 ids"):
        datasets.load_citeulike(folder)
    (folder / "users.dat").write_text("2 0 1\n1 x\n")
    with pytest.raises(ValueError, match=r"users\.dat:2: expected whitespace-separated integers"):
        datasets.load_citeulike(folder)


def test_generic_loader_maps_any_ids_and_filters(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("user,item,rating\nann,book-1,5\nann,book-2,2\nbob,book-1,4\nbob,book-3,5\n")
    data = datasets.load_interactions(path, value_column="rating", min_value=4)
    assert data.user_items.shape == (2, 2)
    assert list(data.user_ids) == ["ann", "bob"] and list(data.item_ids) == ["book-1", "book-3"]
    tsv = tmp_path / "plays.tsv"
    tsv.write_text("7\t100\n7\t200\n9\t100\n")
    assert datasets.load_interactions(tsv).user_items.nnz == 3
    bad = tmp_path / "bad.tsv"
    bad.write_text("7\t100\n8\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2: expected at least 2 fields"):
        datasets.load_interactions(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no interactions"):
        datasets.load_interactions(empty)


def test_synthetic_is_seeded_structured_and_bounded():
    a = datasets.synthetic(n_users=2000, n_items=1000, n_interactions=40000, n_clusters=10, seed=3)
    b = datasets.synthetic(n_users=2000, n_items=1000, n_interactions=40000, n_clusters=10, seed=3)
    assert (a.user_items != b.user_items).nnz == 0
    assert 0.8 * 40000 < a.user_items.nnz < 1.05 * 40000
    # Planted structure: most of a user's items share one cluster.
    clusters = np.array([int(label.split()[1]) for label in a.item_labels])
    heavy = np.flatnonzero(np.diff(a.user_items.indptr) >= 20)
    shares = [np.bincount(clusters[a.user_items[u].indices]).max() / a.user_items[u].nnz for u in heavy]
    assert np.mean(shares) > 0.6
    # Power-law popularity: the top 1% of items hold far more than 1% of interactions.
    popularity = np.sort(np.asarray(a.user_items.sum(axis=0)).ravel())[::-1]
    assert popularity[:10].sum() > 0.05 * popularity.sum()


def test_paper_split_is_per_user_60_20_20_and_deterministic():
    matrix = random_interactions(n_users=30, n_items=200, per_user=10, seed=1)
    matrix = sp.vstack([matrix, random_interactions(n_users=5, n_items=200, per_user=4, seed=2)]).tocsr()
    split = datasets.split_paper(matrix, seed=7)
    assert (split.train + split.validation + split.test != matrix).nnz == 0
    assert split.train.multiply(split.test).nnz == 0 and split.validation.multiply(split.test).nnz == 0
    for user in range(30):
        assert (split.train[user].nnz, split.validation[user].nnz, split.test[user].nnz) == (6, 2, 2)
    for user in range(30, 35):  # fewer than 5 items: all in train
        assert (split.train[user].nnz, split.validation[user].nnz, split.test[user].nnz) == (4, 0, 0)
    again = datasets.split_paper(matrix, seed=7)
    assert split.fingerprint() == again.fingerprint()
    assert datasets.split_paper(matrix, seed=8).fingerprint() != split.fingerprint()


def test_rounding_remainder_goes_to_train():
    matrix = random_interactions(n_users=1, n_items=50, per_user=7, seed=0)
    split = datasets.split_paper(matrix)
    assert (split.train.nnz, split.validation.nnz, split.test.nnz) == (5, 1, 1)


def test_split_round_trip_and_damage(tmp_path):
    split = datasets.split_paper(random_interactions(n_users=20, n_items=40, per_user=8, seed=0), seed=0)
    path = tmp_path / "split.npz"
    split.save(path)
    back = datasets.Split.load(path)
    assert back.fingerprint() == split.fingerprint() and back.seed == 0
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        datasets.Split.load(truncated)
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        datasets.Split.load(tmp_path / "missing.npz")


def test_split_keeps_confidence_weights_and_saves_them(tmp_path):
    matrix = random_interactions(n_users=20, n_items=40, per_user=8, seed=0)
    weighted = matrix.copy()
    weighted.data = np.arange(1, weighted.nnz + 1, dtype=np.float32)
    split, binary = datasets.split_paper(weighted, seed=3), datasets.split_paper(matrix, seed=3)
    assert (split.train + split.validation + split.test != weighted).nnz == 0  # every value where it was
    for name in ("train", "validation", "test"):  # the same entries go to each part, weights or not
        assert (getattr(split, name).astype(bool) != getattr(binary, name).astype(bool)).nnz == 0
    assert split.fingerprint() != binary.fingerprint()
    path, binary_path = tmp_path / "weighted.npz", tmp_path / "binary.npz"
    split.save(path)
    binary.save(binary_path)
    back = datasets.Split.load(path)
    assert (back.train != split.train).nnz == 0 and back.fingerprint() == split.fingerprint()
    assert not any(name.endswith("_data.npy") for name in zipfile.ZipFile(binary_path).namelist())
    # A value that is not finite is damage, even under a recomputed fingerprint.
    members = {n: zipfile.ZipFile(path).read(n) for n in zipfile.ZipFile(path).namelist()}
    buffer = io.BytesIO()
    np.save(buffer, np.full(split.train.nnz, np.nan, np.float32))
    members["train_data.npy"] = buffer.getvalue()
    damaged = tmp_path / "damaged.npz"
    with zipfile.ZipFile(damaged, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(ValueError, match="not finite"):
        datasets.Split.load(damaged)


def test_split_drops_explicit_zeros():
    matrix = random_interactions(n_users=10, n_items=40, per_user=6, seed=0)
    matrix.data[::3] = 0.0  # stored, but not interactions
    split = datasets.split_paper(matrix, seed=0)
    assert split.train.nnz + split.validation.nnz + split.test.nnz == np.count_nonzero(matrix.data)


def test_fold_in_and_cold_start_splits_keep_values_and_drop_stored_zeros():
    matrix = random_interactions(n_users=30, n_items=40, per_user=8, seed=1)
    weighted = matrix.copy()
    weighted.data = np.arange(1, weighted.nnz + 1, dtype=np.float32)
    weighted.data[::7] = 0.0  # stored, but not interactions
    interactions = weighted.copy()
    interactions.eliminate_zeros()

    fold_in = datasets.split_fold_in_users(weighted, fraction=0.2, seed=4)
    binary = datasets.split_fold_in_users(interactions.astype(bool).astype(np.float32), fraction=0.2, seed=4)
    held = interactions[fold_in.users]
    assert (fold_in.fold + fold_in.test != held).nnz == 0  # every value where it was
    others = np.setdiff1d(np.arange(weighted.shape[0]), fold_in.users)
    assert fold_in.train[fold_in.users].nnz == 0 and (fold_in.train[others] != interactions[others]).nnz == 0
    np.testing.assert_array_equal(fold_in.users, binary.users)  # the same draws, values or not
    for name in ("fold", "test"):
        assert (getattr(fold_in, name).astype(bool) != getattr(binary, name).astype(bool)).nnz == 0

    cold = datasets.split_cold_items(weighted, fraction=0.25, seed=5)
    assert (cold.train + cold.test != interactions).nnz == 0
    assert cold.train[:, cold.cold_items].nnz == 0
    assert np.all(np.isin(cold.test.indices, cold.cold_items))
    for split in (datasets.split_fold_in_users, datasets.split_cold_items):
        with pytest.raises(ValueError, match="no interactions"):
            split(sp.csr_matrix((3, 3), dtype=np.float32))


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="no interactions"):
        datasets.split_paper(sp.csr_matrix((3, 3)))
    with pytest.raises(ValueError, match="fractions"):
        datasets.split_paper(random_interactions(3, 10, 5, 0), fractions=(0.5, 0.5, 0.5))
