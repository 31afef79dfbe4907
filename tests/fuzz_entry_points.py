"""Property-based fuzzing of every public entry point (run by test_fuzz.py in a
subprocess, so that an abort or a hang fails the test instead of killing pytest).

Each entry point gets arbitrary arguments: arrays of every dtype (floats of
each width, ints, unsigned, bool, complex, strings, objects), of 0 to 3
dimensions and sizes from empty to large, with NaN, infinities and huge values,
and scalars from -2**70 to 2**70, floats and None where an integer belongs.
The property: the call either returns what a numpy reference computes, or
raises ValueError, TypeError, IndexError or MemoryError whose message names
one of the call's arguments. Anything else (another exception, a wrong
result, an abort) is a failure. Prints a JSON line of counts.

    python tests/fuzz_entry_points.py --examples 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cml_rs
from cml_rs import datasets, evaluation, retrieval

CLEAN = (ValueError, TypeError, IndexError, MemoryError)
COUNTS: Counter = Counter()
CURRENT = ["?"]  # the entry point being fuzzed

DTYPES = st.sampled_from(
    [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.uint64, np.bool_, np.complex64, "U3", object]
)
SIZES = st.one_of(
    st.integers(-3, 12),
    st.sampled_from([2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63), -(2**70)]),
)
ODD_SCALARS = st.one_of(SIZES, st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3))


def arrays(max_dims: int = 3) -> st.SearchStrategy:
    """Arrays of any dtype, shape and content, small enough to compute references."""

    def build(dtype: Any) -> st.SearchStrategy:
        shape = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=6)
        if dtype in ("U3", object):
            letters = st.text(alphabet="ab1", min_size=1, max_size=2)
            return hnp.arrays(np.dtype(dtype), shape, elements=letters)
        elements = None
        if np.issubdtype(np.dtype(dtype), np.floating):
            elements = st.floats(allow_nan=True, allow_infinity=True, width=np.dtype(dtype).itemsize * 8)
        return hnp.arrays(np.dtype(dtype), shape, elements=elements)

    return DTYPES.flatmap(build)


@st.composite
def matching_vectors(draw: Callable) -> tuple[np.ndarray, np.ndarray]:
    """Well-formed queries and items of one dimension (about half the cases), so results get checked."""
    dim = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e6]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    queries = rng.standard_normal((draw(st.integers(1, 7)), dim)) * scale
    items = rng.standard_normal((draw(st.integers(1, 40)), dim)) * scale
    if draw(st.booleans()):
        queries = queries[0]  # one query, 1-D
    return queries.astype(dtype), items.astype(dtype)


def pairs_of_vectors() -> st.SearchStrategy:
    return st.one_of(matching_vectors(), st.tuples(arrays(), arrays()))


def check(names: tuple[str, ...], call: Callable[[], Any], reference: Callable[[Any], None] | None = None) -> None:
    """Runs ``call``: a clean error must name an argument; a result must pass ``reference``."""
    COUNTS["cases"] += 1
    COUNTS[f"cases: {CURRENT[0]}"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = call()
    except CLEAN as error:
        message = str(error)
        if not any(name in message for name in names):
            raise AssertionError(f"{type(error).__name__} names no argument of {names}: {message!r}") from error
        COUNTS["clean errors"] += 1
        return
    COUNTS["results"] += 1
    if reference is not None:
        reference(result)
        COUNTS["results checked against numpy"] += 1


def reference_topk(queries: np.ndarray, items: np.ndarray, k: int) -> Callable[[Any], None]:
    def verify(result: Any) -> None:
        ids, dist = result
        q = np.atleast_2d(np.asarray(queries, np.float64))
        want = ((q[:, None, :] - np.asarray(items, np.float64)[None]) ** 2).sum(-1)
        width = min(k, want.shape[1])
        ids, dist = np.atleast_2d(ids), np.atleast_2d(dist)
        assert ids.shape == (len(q), width), (ids.shape, width)
        best = np.sort(want, axis=1)[:, :width]
        assert np.allclose(dist, best, rtol=1e-3, atol=1e-3), (dist, best)

    return verify


# ---------------------------------------------------------------------- properties


@given(
    vectors=pairs_of_vectors(),
    k=st.one_of(st.integers(1, 50), ODD_SCALARS),
    threads=st.sampled_from([0, 1, 2, -1, 2**63, 10**6]),
)
def fuzz_topk_l2(vectors: Any, k: Any, threads: Any) -> None:
    queries, items = vectors
    valid = (
        isinstance(k, int)
        and 1 <= k < 2**63
        and threads in (0, 1, 2)
        and np.ndim(queries) in (1, 2)
        and np.ndim(items) == 2
    )
    reference = None
    if valid:
        try:
            q, x = np.asarray(queries, np.float64), np.asarray(items, np.float64)
            if (
                np.isfinite(q).all()
                and np.isfinite(x).all()
                and x.shape[0] > 0
                and q.shape[-1] == x.shape[1] > 0
                and np.abs(x).max(initial=0) < 1e15
                and np.abs(q).max(initial=0) < 1e15
            ):
                reference = reference_topk(q, x, k)
        except (TypeError, ValueError):
            reference = None
    check(
        ("queries", "items", "k", "num_threads"),
        lambda: cml_rs.topk_l2(queries, items, k, num_threads=threads),
        reference,
    )


@given(vectors=pairs_of_vectors())
def fuzz_sqdist(vectors: Any) -> None:
    queries, items = vectors

    def verify(result: Any) -> None:
        q, x = np.atleast_2d(np.asarray(queries, np.float64)), np.asarray(items, np.float64)
        want = ((q[:, None, :] - x[None]) ** 2).sum(-1)
        # float32 through ||q||^2 + ||x||^2 - 2 q.x: the error scales with the norms (see sqdist).
        scale = (q**2).sum(1)[:, None] + (x**2).sum(1)[None, :]
        assert np.all(np.abs(result - want) <= 1e-5 * scale + 1e-6), np.abs(result - want).max()

    check(("queries", "items"), lambda: cml_rs.sqdist(queries, items), verify)


@st.composite
def distances(draw: Callable) -> tuple[np.ndarray, np.ndarray]:
    rows, negatives = draw(st.integers(1, 20)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.uniform(0, 4, rows).astype(np.float32), rng.uniform(0, 4, (rows, negatives)).astype(np.float32)


@given(
    dists=st.one_of(distances(), st.tuples(arrays(2), arrays())),
    margin=st.one_of(st.floats(0, 2), st.floats(), st.integers(-5, 5), st.text(max_size=2)),
    n=st.one_of(st.integers(1, 10**6), SIZES),
)
def fuzz_rank_weights(dists: Any, margin: Any, n: Any) -> None:
    pos, neg = dists

    def verify(result: Any) -> None:
        weights, hardest = result
        p, g = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
        impostors = ((np.float32(margin) + p.astype(np.float32))[:, None] - g.astype(np.float32) > 0).sum(1)
        rank = np.floor(np.asarray(n, dtype=object) * impostors // g.shape[1]).astype(np.float64)
        assert np.allclose(weights, np.log(rank + 1), rtol=1e-5), (weights, rank)
        assert np.array_equal(hardest, np.argmin(g.astype(np.float32), axis=1))

    check(("pos_dist", "neg_dist", "margin", "n_items"), lambda: cml_rs.rank_weights(pos, neg, margin, n), verify)


@given(
    density=st.floats(0.0, 1.0),
    shape=st.tuples(st.integers(0, 8), st.integers(0, 8)),
    batch=SIZES,
    negatives=SIZES,
    seed_value=SIZES,
    prefetch=SIZES,
    weighted=st.booleans(),
    values=st.sampled_from([1.0, -1.0, np.nan, 0.0, 3.5]),
)
def fuzz_warp_sampler(density, shape, batch, negatives, seed_value, prefetch, weighted, values) -> None:
    matrix = sp.random(*shape, density=density, random_state=0, format="csr", dtype=np.float32)
    if matrix.nnz:
        matrix.data[0] = values

    def run() -> Any:
        sampler = cml_rs.WarpSampler(
            matrix, batch_size=batch, n_negatives=negatives, seed=seed_value, prefetch=prefetch, weighted=weighted
        )
        pairs = 0
        for users, positives, drawn in sampler:
            row_sets = [set(matrix[u].indices.tolist()) for u in users.tolist()]
            assert all(p in s for p, s in zip(positives.tolist(), row_sets))
            assert all(not (set(row.tolist()) & s) for row, s in zip(drawn, row_sets))
            pairs += len(users)
        assert pairs == matrix.nnz
        return sampler

    names = ("user_items", "batch_size", "n_negatives", "seed", "prefetch", "user_items[")
    check(names, run)


@given(
    dim=SIZES,
    tables=SIZES,
    hashes=SIZES,
    vectors=arrays(),
    ids=st.one_of(st.none(), arrays(2)),
    k=ODD_SCALARS,
    probes=st.one_of(st.none(), SIZES),
)
def fuzz_lsh(dim, tables, hashes, vectors, ids, k, probes) -> None:
    def run() -> Any:
        index = cml_rs.LshIndex(dim, n_tables=tables, n_hashes=hashes)
        index.add_items(vectors, ids=ids)
        found, dist = index.query(np.asarray(vectors)[:3] if np.ndim(vectors) == 2 else vectors, k, n_probes=probes)
        assert np.all(found >= -1) and np.all(np.isfinite(dist) | (found == -1))
        return found

    check(("dim", "n_tables", "n_hashes", "vectors", "ids", "k", "n_probes", "queries"), run)


MODEL_DATA = datasets.synthetic(n_users=40, n_items=30, n_interactions=300, n_clusters=3, seed=0)
MODEL = cml_rs.CML(factors=4, epochs=1, num_threads=1).fit(MODEL_DATA.user_items, show_progress=False)


@given(
    userid=st.one_of(SIZES, arrays(1)),
    rows=st.integers(0, 3),
    n=ODD_SCALARS,
    items=st.one_of(st.none(), arrays(1)),
    banned=st.one_of(st.none(), arrays(1)),
    recalc=st.booleans(),
)
def fuzz_recommend(userid, rows, n, items, banned, recalc) -> None:
    user_items = MODEL_DATA.user_items[:rows]

    def verify(result: Any) -> None:
        ids, scores = result
        assert ids.dtype == np.int32 and np.all(ids >= 0) and np.all(ids < MODEL.n_items)
        assert np.all(np.diff(np.atleast_2d(scores), axis=1) <= 1e-6)

    names = ("userid", "user_items", "N", "items", "filter_items", "not both")
    check(names, lambda: MODEL.recommend(userid, user_items, n, True, banned, recalc, items), verify)


@given(itemid=st.one_of(SIZES, arrays(1)), n=ODD_SCALARS, items=st.one_of(st.none(), arrays(1)))
def fuzz_similar_items(itemid, n, items) -> None:
    check(("itemid", "N", "items"), lambda: MODEL.similar_items(itemid, n, items=items))


@given(k=ODD_SCALARS, users=st.one_of(st.none(), arrays(1)))
def fuzz_ranking_metrics(k, users) -> None:
    split = datasets.split_paper(MODEL_DATA.user_items, seed=0)
    check(("K", "users"), lambda: evaluation.ranking_metrics_at_k(MODEL, split.train, split.test, K=k, users=users))


ID_LISTS = hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6), elements=st.integers(-2, 40))


@given(ids=st.one_of(arrays(), ID_LISTS), users=st.one_of(st.none(), arrays(1), st.lists(st.integers(-1, 60))))
def fuzz_list_metrics(ids, users) -> None:
    split = datasets.split_paper(MODEL_DATA.user_items, seed=0)

    def verify(result: Any) -> None:
        for name in ("recall", "precision", "ndcg", "map"):
            values = result.per_user[name]
            assert len(values) == len(result.per_user["user"]) <= len(np.atleast_2d(ids))
            assert np.all((values >= 0) & (values <= 1 + 1e-12)), (name, values)

    check(("ids", "users", "test"), lambda: evaluation.list_metrics(ids, split.test, users=users), verify)


@given(fractions=st.tuples(st.floats(), st.floats(), st.floats()), min_items=st.integers(-2, 10))
def fuzz_split(fractions, min_items) -> None:
    check(
        ("fractions", "min_items"),
        lambda: datasets.split_paper(MODEL_DATA.user_items, fractions=fractions, min_items=min_items),
    )


@given(vectors=arrays(), k=ODD_SCALARS)
def fuzz_hnsw(vectors, k) -> None:
    check(("vectors", "queries", "k", "empty"), lambda: retrieval.HnswIndex(vectors).query(np.asarray(vectors)[:2], k))


CORPUS = __import__("pathlib").Path(__file__).with_name("corpus")
READERS = {
    "lsh_good.lsh": cml_rs.LshIndex.load,
    "model_good.npz": cml_rs.CML.load,
    "split_good.npz": datasets.Split.load,
}


@given(
    name=st.sampled_from(sorted(READERS)),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=16))),
)
def fuzz_files(name, flips, cut, insert) -> None:
    """A good file of each kind, damaged at random: an error naming the file, or a usable object."""
    import tempfile

    data = bytearray((CORPUS / name).read_bytes())
    for at, xor in flips:
        data[at % len(data)] ^= xor
    if insert is not None:
        at = insert[0] % (len(data) + 1)
        data[at:at] = insert[1]
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/{name}"
        with open(path, "wb") as handle:
            handle.write(bytes(data))
        check((path, "index file", "not a cml-rs"), lambda: READERS[name](path))


PROPERTIES = [
    fuzz_topk_l2,
    fuzz_sqdist,
    fuzz_rank_weights,
    fuzz_warp_sampler,
    fuzz_lsh,
    fuzz_recommend,
    fuzz_similar_items,
    fuzz_ranking_metrics,
    fuzz_list_metrics,
    fuzz_split,
    fuzz_hnsw,
    fuzz_files,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100, help="examples per entry point")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for prop in PROPERTIES:
        runner = settings(
            max_examples=args.examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(seed(args.seed)(prop))
        CURRENT[0] = prop.__name__.removeprefix("fuzz_")
        runner()
    print(json.dumps(dict(sorted(COUNTS.items()))))


if __name__ == "__main__":
    sys.exit(main())
