"""The paper's claims and its referee's objections as measured statements with computed verdicts.

Each :class:`Claim` is a statement that an interval can decide: a quantity lies above a
level (``"above"``), below one (``"below"``), or within a margin of zero
(``"within"``, an equivalence claim such as "comparable" or "changes little").
:func:`claim_verdict` reads the verdict from the 95% interval of the measured
quantity, never from its point value:

=========== ====================== ========================== ============================
test        supported              contradicted               not decided at this scale
=========== ====================== ========================== ============================
above t     low end above t        high end below t           the interval contains t
below t     high end below t       low end above t            the interval contains t
within ±m   interval inside ±m     interval wholly outside ±m the interval crosses ±m
=========== ====================== ========================== ============================

:class:`Evidence` rows are built from what the chapters write: their ``metrics.json``
(:func:`evidence_from_metrics`, chapters 4 to 7) and chapter 8's ablation effects
(:func:`evidence_from_effects`); the same functions read a recorded run's metrics, so
a recorded GPU run and this run's profile sit side by side in :func:`claims_table`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pandas as pd

TESTS = ("above", "below", "within")
CLAIM_VERDICTS = ("supported", "contradicted", "not decided", "not measured")


@dataclass(frozen=True)
class Claim:
    """One claim: ``id`` (C1…C6, R1, R2), what the paper or referee says, what is
    measured, and the ``test`` with its ``level`` (a threshold for above/below, a margin
    for within) in the measure's ``unit``."""

    id: str
    statement: str
    measure: str
    test: str
    level: float
    unit: str = "Dice"

    def __post_init__(self):
        if self.test not in TESTS:
            raise ValueError(f"claim {self.id}: test must be one of {TESTS}, got {self.test!r}")
        if self.test == "within" and not self.level > 0:
            raise ValueError(f"claim {self.id}: an equivalence margin must be positive, got {self.level}")

    @property
    def rule(self) -> str:
        """The decision rule in words (shown beside the verdict)."""
        return {"above": f"> {self.level:g}", "below": f"< {self.level:g}", "within": f"within ±{self.level:g}"}[
            self.test]


def claim_verdict(lo: float | None, hi: float | None, test: str, level: float) -> str:
    """The verdict of a claim from the 95% interval ``[lo, hi]`` of its measure (see the
    module docstring); ``"not measured"`` when the interval is missing (None or NaN)."""
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "not measured"
    if lo > hi:
        raise ValueError(f"interval low end {lo} above its high end {hi}")
    if test == "above":
        return "supported" if lo > level else "contradicted" if hi < level else "not decided"
    if test == "below":
        return "supported" if hi < level else "contradicted" if lo > level else "not decided"
    return ("supported" if -level < lo and hi < level
            else "contradicted" if lo > level or hi < -level else "not decided")


def paper_claims(c1_margin: float = 0.05, c6_margin: float = 0.02, r1_gap: float = 1.0,
                 r2_keep: float = 0.8, c3_k: int = 4) -> dict[str, Claim]:
    """The claims of the paper (C1–C6) and of its referee (R1, R2) with their decision levels.

    c1_margin: Dice difference within which the VLM counts as comparable to the U-Net;
    c6_margin: Dice difference within which vision fine-tuning "changes little";
    r1_gap: the largest shape gap (Wasserstein distance in standard deviations of the
    real set) at which projected lung fields count as shaped like real ones;
    r2_keep: the share of its unshifted Dice the VLM must keep under every shift;
    c3_k: the number of examples at which sample efficiency is read.
    """
    claims = [
        Claim("C1", "the VLM is comparable to a U-Net in distribution",
              "VLM − U-Net lung-field Dice, held-out images", "within", c1_margin),
        Claim("C2", "the VLM is more robust than the U-Net under geometric shift",
              "VLM drop − U-Net drop in lung-field Dice, rendered geometric shifts at their most severe",
              "below", 0.0),
        Claim("C3", "anatomy pretraining makes a better few-shot learner",
              f"anatomy VLM − image-level VLM Dice at k = {c3_k}", "above", 0.0),
        Claim("C4", "larger models segment better",
              "largest − smallest model, lung-field Dice", "above", 0.0),
        Claim("C5", "higher input resolution segments better",
              "highest − lowest input resolution, lung-field Dice", "above", 0.0),
        Claim("C6", "fine-tuning the vision encoder changes little",
              "vision tower trained − frozen, lung-field Dice", "within", c6_margin),
        Claim("R1", "synthetic films are close enough to real ones (the referee asks for the gap)",
              "largest shape gap of projected vs real lung fields", "below", r1_gap, unit="SD of the real set"),
        Claim("R2", "the VLM keeps its accuracy under every shift (the referee asks for failure modes)",
              "VLM Dice under the worst shift / unshifted, lung fields", "above", r2_keep, unit="ratio"),
    ]
    return {c.id: c for c in claims}


@dataclass
class Evidence:
    """One measurement of a claim: the value with its 95% interval, where it comes from
    (``source``: this run's profile or a record) and what was measured (``detail``)."""

    claim: str
    value: float | None
    lo: float | None
    hi: float | None
    source: str
    detail: str = ""


def _get(m: Mapping[str, Any], key: str) -> tuple[float | None, float | None, float | None]:
    return m.get(key), m.get(f"{key}_lo"), m.get(f"{key}_hi")


def evidence_from_metrics(stages: Mapping[str, Mapping[str, Any]], source: str, c3_k: int = 4) -> list[Evidence]:
    """Evidence for C1, C2, C3, R1 and R2 from chapters' ``metrics.json``.

    stages: ``{stage name: metrics}`` for any of ``04_unet_baseline`` (C1),
    ``05_shift`` (C2, R2), ``06_real_radiographs`` (R1), ``07_few_shot`` (C3); a stage
    that is missing, or a metric it lacks, gives no evidence for its claim.
    """
    out: list[Evidence] = []
    m4 = stages.get("04_unet_baseline") or {}
    v, lo, hi = _get(m4, "lung_fields_unet_minus_vlm_dice_difference")
    if None not in (v, lo, hi):
        out.append(Evidence("C1", -v, -hi, -lo, source, "from chapter 4's paired U-Net − VLM difference"))
    m5 = stages.get("05_shift") or {}
    v, lo, hi = _get(m5, "c2_geometric_vlm_minus_unet_drop_difference")
    if None not in (v, lo, hi):
        out.append(Evidence("C2", v, lo, hi, source, f"{int(m5.get('n_images', 0))} test films"))
    ratios = {}
    for key, val in m5.items():
        hit = re.fullmatch(r"shift_(.+)_vlm_lung_fields_robustness", key)
        if hit and val is not None:
            ratios[hit.group(1)] = _get(m5, key)
    if ratios:
        axis, (v, lo, hi) = min(ratios.items(), key=lambda kv: kv[1][0])
        out.append(Evidence("R2", v, lo, hi, source, f"worst of {len(ratios)} shifts: {axis.replace('_', ' ')}"))
    m6 = stages.get("06_real_radiographs") or {}
    gaps = {}
    for key, val in m6.items():
        hit = re.fullmatch(r"shape_gap_(.+_(?:left|right))_(.+)_standardised", key)  # side, statistic
        if hit and val is not None and m6.get(f"{key}_lo") is not None:
            gaps[(hit.group(1), hit.group(2))] = _get(m6, key)
    if gaps:
        (side, stat), (v, lo, hi) = max(gaps.items(), key=lambda kv: kv[1][0])
        out.append(Evidence("R1", v, lo, hi, source,
                            f"largest of {len(gaps)}: {stat.replace('_', ' ')}, {side.replace('_', ' ')}"))
    m7 = stages.get("07_few_shot") or {}
    for key in sorted(m7):
        hit = re.fullmatch(rf"c3_(.+)_k{int(c3_k)}_difference", key)
        if hit:
            v, lo, hi = _get(m7, key)
            if None not in (v, lo, hi):
                out.append(Evidence("C3", v, lo, hi, source, hit.group(1).replace("_", " ")))
    return out


def evidence_from_effects(effects: pd.DataFrame, structure: str = "lung fields") -> list[Evidence]:
    """Evidence for C4, C5 and C6 from chapter 8's ablation effects
    (:func:`~chexanatomy_lib.evaluation.ablations.sweep_effects`), one per sweep and source."""
    if effects is None or not len(effects):
        return []
    rows = effects[effects["structure"] == structure]
    return [Evidence(str(r["claim"]), r["difference"], r["difference_lo"], r["difference_hi"], str(r["source"]),
                     f"{r['contrast']} ({r['sweep']}; {int(r['seeds_a'])}+{int(r['seeds_b'])} seeds, "
                     f"{int(r['images'])} images)")
            for _, r in rows.iterrows()]


def claims_table(evidence: Iterable[Evidence], claims: Mapping[str, Claim]) -> pd.DataFrame:
    """One row per measurement (a claim without any gets one ``not measured`` row), in the
    order of ``claims``: ``claim``, ``statement``, ``measure``, ``value``, ``lo``, ``hi``,
    ``interval`` (formatted), ``rule``, ``from``, ``detail``, ``verdict``."""
    by_claim: dict[str, list[Evidence]] = {}
    for e in evidence:
        if e.claim not in claims:
            raise ValueError(f"evidence for an unknown claim {e.claim!r}")
        by_claim.setdefault(e.claim, []).append(e)
    rows = []
    for cid, c in claims.items():
        for e in by_claim.get(cid) or [Evidence(cid, None, None, None, "—", "no chapter or record measured it")]:
            verdict = claim_verdict(e.lo, e.hi, c.test, c.level)
            sign = "+" if c.unit == "Dice" else ""  # differences carry their sign
            shown = ("—" if e.value is None or not math.isfinite(e.value)
                     else f"{e.value:{sign}.3f} [{e.lo:{sign}.3f}, {e.hi:{sign}.3f}]")
            rows.append({"claim": cid, "statement": c.statement, "measure": c.measure, "value": e.value,
                         "lo": e.lo, "hi": e.hi, "interval": shown, "rule": f"{c.rule} ({c.unit})",
                         "from": e.source, "detail": e.detail, "verdict": verdict})
    return pd.DataFrame(rows)
