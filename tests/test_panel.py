"""The quality panel's own logic (benches/panel.py): the grid search that pushes a best
value off its grid's edge, the report's paired comparisons, and the probes' label check.
RESULTS.md's panel tables rest on these, so they are checked on made-up scores here."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from cml_rs import datasets, evaluation

sys.path.insert(0, str(REPO_ROOT / "benches"))
import panel  # benches/ is not a package: found through sys.path


def peaked_at(**peaks: float):
    """A validation score with one peak per setting, in log scale, recording each point asked."""
    asked = []

    def score(params):
        asked.append(dict(params))
        recall = -sum((math.log10(params[name]) - math.log10(peak)) ** 2 for name, peak in peaks.items())
        return recall, {"model": None, "fit_seconds": 0.0}

    return score, asked


def test_a_best_value_on_the_grids_edge_is_pushed_outward_until_it_lies_inside():
    score, asked = peaked_at(regularization=1000.0)
    result = panel.grid_search({"regularization": [1.0, 10.0, 100.0]}, score)
    assert result["params"] == {"regularization": 1000.0}
    # 1000 won on the edge, so 10000 was tried too, and lost: the best is now inside.
    assert [p["regularization"] for p in asked] == [1.0, 10.0, 100.0, 1000.0, 10000.0]
    assert result["grid"]["regularization"] == [1.0, 10.0, 100.0, 1000.0, 10000.0]
    assert result["still_on_edge"] == [] and result["at_bound"] == []
    assert len(result["trials"]) == 5


def test_the_lower_edge_is_pushed_by_the_grids_own_step_and_integers_stay_integers():
    score, asked = peaked_at(top_k=10.0)
    result = panel.grid_search({"top_k": [50, 200]}, score)
    # Down by the grid's factor of 4: 50 -> 12 (rounded) -> 3 lies below the bound of 5.
    assert [p["top_k"] for p in asked] == [50, 200, 12]
    assert result["params"] == {"top_k": 12} and isinstance(result["params"]["top_k"], int)
    assert result["at_bound"] == ["top_k"] and result["still_on_edge"] == []


def test_a_setting_left_on_its_edge_is_named():
    far, _ = peaked_at(alpha=1e9)
    result = panel.grid_search({"alpha": [1.0, 10.0]}, far, rounds=2, bounds={})
    assert result["params"] == {"alpha": 1000.0}
    assert result["still_on_edge"] == ["alpha"] and result["at_bound"] == []  # the rounds ran out, not the room
    bounded = panel.grid_search({"alpha": [1.0, 10.0]}, far, bounds={"alpha": (0.0, 100.0)})
    assert bounded["params"] == {"alpha": 100.0}
    assert bounded["still_on_edge"] == [] and bounded["at_bound"] == ["alpha"]


def test_zero_switches_and_single_values_are_not_pushed():
    def score(params):
        return -params["beta"] + (0.1 if params["normalize"] else 0.0), {}

    result = panel.grid_search({"beta": [0.0, 0.3], "normalize": [True, False], "factors": [100]}, score)
    assert result["params"] == {"beta": 0.0, "normalize": True, "factors": 100}
    assert len(result["trials"]) == 4  # the product of the grid, nothing beyond it
    assert result["still_on_edge"] == [] and result["at_bound"] == []


def test_the_report_pairs_each_model_with_cmls_users_over_the_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(panel, "PANEL_DIR", tmp_path)
    rng = np.random.default_rng(0)
    per_user = {}
    for seed in (0, 1):
        users = np.arange(40 + seed)
        for model, shift in (("cml", 0.0), ("wrmf", 0.05), ("ease", -0.02)):
            recall = np.clip(rng.uniform(0.2, 0.6, users.size) + shift, 0, 1)
            per_user[(seed, model)] = recall
            np.savez_compressed(tmp_path / f"ml-100k__seed{seed}__{model}.npz", user=users, **{"recall@50": recall})
            record = {"dataset": "ml-100k", "seed": seed, "model": model, "test": {"recall@50": recall.mean()}}
            if model == "wrmf":
                record.update(params={"alpha": 80.0}, still_on_edge=[], at_bound=["iterations"])
            (tmp_path / f"ml-100k__seed{seed}__{model}.json").write_text(json.dumps(record))

    table = panel.report("recall@50")
    wrmf_row = next(line for line in table.splitlines() if line.startswith("| wrmf "))
    means = [per_user[(s, "wrmf")].mean() for s in (0, 1)]
    ours = np.concatenate([per_user[(s, "cml")] for s in (0, 1)])
    theirs = np.concatenate([per_user[(s, "wrmf")] for s in (0, 1)])
    p = evaluation.paired_pvalues(ours, theirs)["wilcoxon_p"]
    assert f"| {np.mean(means):.4f} | {np.std(means):.4f} | {means[0]:.4f}, {means[1]:.4f} |" in wrmf_row
    assert f"| {(ours - theirs).mean():+.4f} | {p:.2g} |" in wrmf_row
    assert "(edge: iterations at its bound)" in wrmf_row

    summary = panel.standing("recall@50").splitlines()[-1]
    cml_mean = np.mean([per_user[(s, "cml")].mean() for s in (0, 1)])
    assert summary.startswith(f"| ml-100k | wrmf {np.mean(means):.4f} (2) | {cml_mean:.4f}, ")
    assert f"{cml_mean / np.mean(means) - 1:+.1%}, {p:.2g} (2)" in summary


def test_a_probe_label_it_lacks_stops_the_run_with_the_labels_it_has():
    assert next(iter(panel.probe_candidates("margin"))) == "defaults"
    assert panel.probe_candidates("gowalla", ["margin=0.95"]) == {"margin=0.95": {"margin": 0.95}}
    with pytest.raises(SystemExit, match=r"--labels: \['margin=9'\] not in probe 'margin'; its labels: .*margin=1.0"):
        panel.probe_candidates("margin", ["margin=1.0", "margin=9"])


def test_a_tuning_job_resumes_from_the_points_it_had_scored(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(panel, "PANEL_DIR", tmp_path)
    monkeypatch.setitem(panel.GRIDS, "ease", {"regularization": [1.0, 10.0, 100.0]})
    split = datasets.split_paper(datasets.synthetic(200, 80, 3000, n_clusters=4, seed=0).user_items, seed=0)
    fitted = []
    fit = panel.fit_baseline

    def counting_fit(family, split, params, threads, seed):
        fitted.append(params["regularization"])
        return fit(family, split, params, threads, seed)

    monkeypatch.setattr(panel, "fit_baseline", counting_fit)
    first = panel.tune("ease", split, 1, 0, "tiny")
    scored = list(fitted)
    assert len(scored) >= 3 and first["params"]["regularization"] in scored
    # A line cut off mid-write and a line of another split are ignored; the best point's
    # stored score is made up here (as a fit that does not repeat would leave it).
    store = panel.trials_path("tiny", 0, "ease")
    best = next(e for e in map(json.loads, store.read_text().splitlines()) if e["params"] == first["params"])
    with open(store, "a") as handle:
        handle.write(json.dumps({**best, "validation": best["validation"] + 0.01}) + "\n")
        handle.write(json.dumps({"params": {"regularization": 1000.0}, "validation": 2.0, "split": "other"}) + "\n")
        handle.write('{"params": {"regulariz')
    fitted.clear()
    again = panel.tune("ease", split, 1, 0, "tiny")
    # Only the best point is fitted again (its model is needed for the test part).
    assert fitted == [first["params"]["regularization"]]
    assert again["params"] == first["params"]
    assert again["validation"] == pytest.approx(first["validation"], abs=1e-12)  # the refit, scored
    assert "(stored " in capsys.readouterr().out  # and the stored score that differs, named
    assert [t["params"] for t in again["trials"]] == [t["params"] for t in first["trials"]]
    assert all(t["scored_by_an_earlier_run"] for t in again["trials"])
    assert not any("scored_by_an_earlier_run" in t for t in first["trials"])
    np.testing.assert_allclose(again["model"].item_weights_, first["model"].item_weights_)
    # Another split (another seed's data) is scored afresh.
    fitted.clear()
    other = datasets.split_paper(datasets.synthetic(200, 80, 3000, n_clusters=4, seed=1).user_items, seed=0)
    monkeypatch.setattr(panel, "trials_path", lambda *_: store)
    panel.tune("ease", other, 1, 0, "tiny")
    assert len(fitted) >= 3
