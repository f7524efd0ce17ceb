"""Few-shot sampling and curves: seeded nested draws saved and read back, intervals over
seeds and images, areas, the k that reaches a reference, and paired start differences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chexanatomy_lib.evaluation.metrics import two_level_bootstrap
from chexanatomy_lib.fewshot.curves import area_under_curve, k_to_reach, kshot_curves, start_difference
from chexanatomy_lib.fewshot.sampling import kshot_draws, load_draws, save_draws


def test_draws_are_seeded_nested_and_saved(tmp_path):
    rows = np.arange(100, 140)
    d = kshot_draws(rows, [4, 1, 2, 16], seeds=[0, 1])
    assert list(d["k"][:4]) == [1, 2, 4, 16] and set(d["seed"]) == {0, 1}
    for seed in (0, 1):
        sets = [set(r) for r in d[d["seed"] == seed]["rows"]]
        assert all(a < b for a, b in zip(sets, sets[1:]))  # nested: the 2-shot set holds the 1-shot set
        assert sets[-1] <= set(rows.tolist())
    assert d[d["seed"] == 0]["rows"].tolist() != d[d["seed"] == 1]["rows"].tolist()
    again = kshot_draws(rows[::-1], [1, 2, 4, 16], seeds=[0, 1])  # the order of the eligible rows does not matter
    assert again["rows"].tolist() == d["rows"].tolist()
    back = load_draws(save_draws(d, tmp_path / "draws.json"))
    assert back["rows"].tolist() == d["rows"].tolist()
    with pytest.raises(ValueError, match="k = 50 needs 50"):
        kshot_draws(rows, [50], seeds=[0])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: not a k-shot draw file"):
        load_draws(tmp_path / "bad.json")


def _scores(effect: float, noise: float = 0.05, seeds=(0, 1, 2), images=20, ks=(1, 2, 4, 8)):
    rng = np.random.default_rng(0)
    rows = []
    for start, gain in (("A", effect), ("B", 0.0)):
        for k in ks:
            for s in seeds:
                for i in range(images):
                    d = np.clip(0.3 + 0.1 * np.log2(k) + gain + rng.normal(0, noise), 0, 1)
                    rows.append({"task": "t", "start": start, "k": k, "seed": s, "image_id": f"im{i}",
                                 "structure": "x", "dice": d})
    return pd.DataFrame(rows)


def test_curves_summaries_and_differences():
    scores = _scores(effect=0.1)
    curves = kshot_curves(scores, n_boot=200)
    a = curves.xs(("t", "A"))
    assert list(a.index) == [1, 2, 4, 8] and (a["seeds"] == 3).all() and (a["images"] == 20).all()
    assert (a["dice_lo"] <= a["dice"]).all() and (a["dice"] <= a["dice_hi"]).all()
    assert a["dice"].is_monotonic_increasing
    auc = area_under_curve(scores, n_boot=200)
    # mean height of 0.3 + 0.1 log2 k over log2 k in [0, 3] is 0.45 (B) and 0.55 (A)
    assert auc.at[("t", "B"), "auc"] == pytest.approx(0.45, abs=0.01)
    assert auc.at[("t", "A"), "auc"] == pytest.approx(0.55, abs=0.01)
    reach = k_to_reach(curves, {"t": 0.58})
    assert reach.at[("t", "A"), "k reaching it"] == 4 and reach.at[("t", "B"), "k reaching it"] == 8
    diff = start_difference(scores, "A", "B", n_boot=200)
    assert (diff["verdict"] == "A better").all() and diff["difference"].to_numpy() == pytest.approx(0.1, abs=0.02)
    same = start_difference(_scores(effect=0.0, noise=0.1), "A", "B", n_boot=200)
    assert (same["verdict"] == "not distinguishable").all(), same  # no effect: every interval holds zero


def test_two_level_bootstrap_widens_with_seed_variation():
    rng = np.random.default_rng(1)
    images = rng.normal(0.5, 0.05, 30)
    steady = np.tile(images, (3, 1))
    shaky = steady + np.array([[-0.2], [0.0], [0.2]])  # the draws disagree
    _, lo1, hi1, _ = two_level_bootstrap(steady, 500)
    _, lo2, hi2, _ = two_level_bootstrap(shaky, 500)
    assert hi2 - lo2 > 3 * (hi1 - lo1)
    assert np.isnan(two_level_bootstrap(np.full((2, 3), np.nan))[0])
