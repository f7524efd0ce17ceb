"""Chapter 7 as executed in the smoke book: every start ran every (task, k, seed) on the
saved draw, and every summary it prints follows from its per-image scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def chapter(smoke_run):
    out = smoke_run.run_dir / "07_few_shot"
    return {"out": out, "params": json.loads((out / "params.json").read_text()),
            "scores": pd.read_csv(out / "kshot_scores.csv"), "metrics": json.loads((out / "metrics.json").read_text())}


def test_every_start_ran_every_draw(chapter):
    from chexanatomy_lib.fewshot.sampling import load_draws

    p, scores = chapter["params"], chapter["scores"]
    assert set(scores["task"]) == set(p["tasks"]) and set(scores["start"]) == set(p["starts"])
    assert len(p["seeds"]) >= 3
    for task in p["tasks"]:
        draws = load_draws(chapter["out"] / f"draws_{task.replace(' ', '_')}.json")
        assert sorted(set(draws["k"])) == sorted(k for k in p["ks"] if k in set(draws["k"]))
        assert set(draws["seed"]) == set(p["seeds"])
        for k, seed in zip(draws["k"], draws["seed"]):
            runs = scores[(scores["task"] == task) & (scores["k"] == k) & (scores["seed"] == seed)]
            assert set(runs["start"]) == set(p["starts"]), (task, k, seed)
            n = runs.groupby("start")["image_id"].nunique()
            assert n.nunique() == 1  # every start scored on the same test images
        for seed, g in draws.groupby("seed"):  # nested draws
            sets = [set(r) for r in g.sort_values("k")["rows"]]
            assert all(a <= b for a, b in zip(sets, sets[1:]))


def test_summaries_follow_from_the_scores(chapter):
    from chexanatomy_lib.fewshot.curves import start_difference

    c3 = pd.read_csv(chapter["out"] / "c3_differences.csv")
    expected = np.where(c3["difference_lo"] > 0, "A better",
                        np.where(c3["difference_hi"] < 0, "A worse", "not distinguishable"))
    assert (c3["verdict"] == expected).all()
    again = start_difference(chapter["scores"], "anatomy VLM", "image-level VLM", n_boot=chapter["params"]["n_boot"],
                             seed=chapter["params"]["seed"]).reset_index()
    assert np.allclose(again["difference"], c3["difference"])
    summary = pd.read_csv(chapter["out"] / "kshot_summary.csv")
    assert ((summary["auc_lo"] <= summary["auc"] + 1e-12) & (summary["auc"] <= summary["auc_hi"] + 1e-12)).all()
    assert chapter["scores"]["dice"].between(0, 1).all()
