"""Miniature copies of the bundled data sets, in their real file formats.

Each writer creates one data-set folder under ``root`` with a handful of
hand-written lines, so the loaders' code runs (and is checked against known
answers) on machines without the real data.
"""

from __future__ import annotations

from pathlib import Path


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="latin-1" if name in ("u.item", "movies.dat") else "utf-8")
    return folder


def citeulike(root: Path) -> Path:
    """4 articles, 3 users; tags 'ml' (3 articles), 'bio' (1), 'stats' (2)."""
    return write(
        root / "citeulike-t",
        {
            "users.dat": "2 0 3\n1 1\n3 3 2 0\n",
            "mult.dat": "2 0:1 2:3\n1 1:2\n0\n2 2:1 0:4\n",
            "vocabulary.dat": "model\ncell\nrank\n",
            "tags.dat": "ml\nbio\nstats\n",
            "tag-item.dat": "3 0 2 3\n1 1\n2 3 0\n",
        },
    )


def movielens_100k(root: Path) -> Path:
    """3 users, 3 movies, 4 genres; ratings of 4 and more are positives."""
    return write(
        root / "ml-100k",
        {
            "u.data": "1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t3\t4\t881250951\n3\t1\t4\t881250952\n3\t3\t1\t1\n",
            "u.genre": "unknown|0\nAction|1\nComedy|2\nDrama|3\n\n",
            "u.item": (
                "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1|0\n"
                "2|Heat (1995)|01-Jan-1995||http://x|0|1|0|1\n"
                "3|Caf\xe9 (1996)|01-Jan-1996||http://x|0|0|0|1\n"
            ),
            "u.user": "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n",
            "u.occupation": "other\ntechnician\nwriter\n",
        },
    )


def movielens_1m_implicit(root: Path) -> Path:
    """3 users, 4 items (movies 10, 20, 30, 40), an 80/20 split as shipped."""
    return write(
        root / "ml-1m-implicit",
        {
            "user_list.txt": "1 0\n2 1\n3 2\n",
            "item_list.txt": "10 0 10\n20 1 20\n30 2 30\n40 3 40\n",
            "train.txt": "0 0 1\n1 2\n2 0 3\n",
            "test.txt": "0 2\n2 1\n",
            "movies.dat": "10::Alien (1979)::Horror|Sci-Fi\n20::Heat (1995)::Action\n30::Up (2009)::Comedy\n",
            "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n",
        },
    )


def movielens_latest_small(root: Path) -> Path:
    """3 users, 3 movies, genres and tags; ratings of 4 and more are positives."""
    return write(
        root / "ml-latest-small",
        {
            "ratings.csv": "userId,movieId,rating,timestamp\n1,1,4.0,1\n1,7,2.5,1\n5,7,5.0,1\n9,3,4.5,1\n9,1,3.0,1\n",
            "movies.csv": (
                "movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n"
                '3,"Good, Bad (1966)",Western\n7,Heat (1995),Action|Crime\n'
            ),
            "tags.csv": "userId,movieId,tag,timestamp\n2,1,Pixar,1\n2,1,pixar ,1\n3,7,heist,1\n",
        },
    )


def gowalla(root: Path) -> Path:
    """3 users, 4 places, train/valid/test as shipped (ids with a header line)."""
    return write(
        root / "gowalla",
        {
            "user_list.txt": "org_id remap_id\n343 0\n5258 1\n77 2\n",
            "item_list.txt": "org_id remap_id\n8975 0\n9190 1\n12 2\n40 3\n",
            "train.txt": "0 0 1\n1 2 3\n2 0\n",
            "valid.txt": "0 2\n2 3\n",
            "test.txt": "0 3\n1 0\n2 1\n",
        },
    )
