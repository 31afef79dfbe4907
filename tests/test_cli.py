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


def test_compare_ranks_cml_against_tuned_baselines(tmp_path, capsys):
    data = write_interactions(tmp_path / "plays.tsv", n_users=120, n_items=60)
    argv = ["compare", str(data), "-k", "10", "--epochs", "4", "--factors", "8", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"model", "CML", "popularity", "EASE", "RP3beta"}
    assert "factors=8, epochs=4" in rows["CML"] and "(grid [50.0, 200.0, 800.0, 3200.0])" in rows["EASE"]
    for name in ("popularity", "EASE", "RP3beta"):
        recall, ndcg, p_value = (rows[name].split("|")[i].strip() for i in (2, 3, 5))
        assert 0 <= float(recall) <= 1 and 0 <= float(ndcg) <= 1 and 0 <= float(p_value) <= 1
    assert cli.main([*argv, "--ease-max-items", "10"]) == 0
    assert "EASE skipped: 60 items exceed --ease-max-items 10" in capsys.readouterr().out


def test_tune_searches_and_saves_the_best_model(tmp_path, capsys):
    data = write_interactions(tmp_path / "plays.tsv", n_users=120, n_items=60)
    model = tmp_path / "best.npz"
    argv = ["tune", str(data), "--configurations", "3", "--epochs", "6", "--factors", "8", "--no-progress"]
    assert cli.main([*argv, "--margin", "0.7", "--out", str(model)]) == 0
    out = capsys.readouterr().out
    assert "| learning_rate | n_negatives | lambda_c | epochs |" in out  # margin fixed, not searched
    assert "test metrics of the best model" in out and model.exists()
    from cml_rs import CML

    loaded = CML.load(model)
    assert loaded.margin == 0.7 and loaded.factors == 8
    assert "before early stopping" not in out  # 6 epochs fit in the default budget
    assert cli.main([*argv, "--budget", "0.01"]) == 0
    assert "the budget ended the best model's training before early stopping" in capsys.readouterr().out
    fixed_all = ["--margin", "1", "--learning-rate", "0.05", "--negatives", "10", "--lambda-c", "1"]
    assert cli.main([*argv, *fixed_all]) == 2
    assert "nothing to tune" in capsys.readouterr().err


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
