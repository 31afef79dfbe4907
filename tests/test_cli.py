"""The cml-rs command: each subcommand on small data, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cml_rs import cli


def write_interactions(path, n_users=60, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["user\titem"]
    for u in range(n_users):
        for i in rng.choice(n_items, 8, replace=False):
            lines.append(f"u{u}\ti{(i + u) % n_items}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_evaluate_recommend(tmp_path, capsys):
    data = write_interactions(tmp_path / "plays.tsv")
    model = tmp_path / "model.npz"
    split = tmp_path / "split.npz"
    common = ["--split-file", str(split)]
    assert (
        cli.main(
            [
                "train",
                str(data),
                "--out",
                str(model),
                "--epochs",
                "3",
                "--factors",
                "8",
                "--no-progress",
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "test metrics" in out and "| 50 |" in out and model.exists() and split.exists()
    assert cli.main(["evaluate", str(model), str(data), "--json", "-k", "10", *common]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["10"]) >= {"recall", "precision", "ndcg", "map"}
    assert cli.main(["recommend", str(model), str(data), "--users", "0", "1", "-n", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 and rows[0]["item_id"].startswith("i")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "no-such-dataset"], "neither a known data set"),
        (["evaluate", "missing.npz", "ml-100k"], "missing.npz does not exist"),
        (["train", "BAD_FILE", "--epochs", "1"], "expected at least 2 fields"),
    ],
)
def test_bad_input_exits_with_one_line(tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.tsv"
    bad.write_text("u1\ti1\nu2\n")
    argv = [str(bad) if a == "BAD_FILE" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cml-rs: error:") and message in err and "\n" not in err


def test_console_script_help_explains_options():
    result = subprocess.run(
        [sys.executable, "-m", "cml_rs", "train", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--margin", "--negatives", "--lambda-c", "--split-file", "--features", "--device"):
        assert option in result.stdout
    failed = subprocess.run([sys.executable, "-m", "cml_rs", "train", "nope"], capture_output=True, text=True)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr


@pytest.mark.slow
def test_demo_on_synthetic_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CML_DATA", str(tmp_path / "nothing-here"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--epochs", "4", "--plot-items", "300", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "synthetic data set instead" in text and "test metrics" in text and "top-5 recommendations" in text
    assert (out / "item_embedding.png").stat().st_size > 10000
    assert (out / "model.npz").exists() and (out / "split.npz").exists()
