"""Constrained decoding: always valid output, the same token ids as training, robust parsing."""

from __future__ import annotations

import numpy as np
import pytest

from chexanatomy_lib.evaluation.metrics import invalid_rate
from chexanatomy_lib.vlm.decode import SEG, X0, X1, Y0, Y1, generate_segment, grammar_plan


def valid_of(decoded) -> np.ndarray:
    """bool [n images, n structures]: which decoded instances are well formed."""
    return np.array([[p.valid for p in d.parsed] for d in decoded])
from chexanatomy_lib.vlm.model import build_tiny
from chexanatomy_lib.vlm.tasks import Sample, encode_batch

NAMES = ["left lung", "right lung", "cardiac silhouette", "left clavicle", "spine"]


@pytest.fixture(scope="module")
def untrained():
    return build_tiny("tiny", seed=1)


def _images(n=3, size=96):
    rng = np.random.default_rng(0)
    return [rng.random((size, size)).astype(np.float32) for _ in range(n)]


def test_constrained_decoding_is_valid_for_every_structure_even_untrained(untrained):
    decoded = generate_segment(untrained, _images(3), NAMES, constrained=True, batch_size=2)
    assert len(decoded) == 3
    for d in decoded:
        assert [p.name for p in d.parsed] == NAMES
        for p in d.parsed:
            assert p.valid, (p.reason, d.text)
            assert p.box[2] > p.box[0] and p.box[3] > p.box[1]
            assert p.codes.shape == (16,) and 0 <= p.codes.min() and p.codes.max() < 128
    assert invalid_rate(valid_of(decoded)) == 0.0


def test_free_decoding_of_an_untrained_model_is_reported_not_raised(untrained):
    decoded = generate_segment(untrained, _images(1), NAMES[:2], constrained=False)
    for d in decoded:
        assert len(d.parsed) == 2  # one entry per requested name, valid or not
        for p in d.parsed:
            assert p.valid or p.reason
    assert 0.0 <= invalid_rate(valid_of(decoded)) <= 1.0


def test_grammar_plan_forces_exactly_the_training_token_ids(untrained):
    tok = untrained.processor.tokenizer
    plan = grammar_plan(tok, NAMES[:3])
    assert plan.count(SEG) == 48 and plan[:4] == [Y0, X0, Y1, X1] and plan[-1] == tok.eos_token_id
    from chexanatomy_lib.codec import format_target

    rng = np.random.default_rng(0)
    target = format_target("segment", [(n, np.array([0.1, 0.2, 0.6, 0.7]), rng.integers(0, 128, 16))
                                       for n in NAMES[:3]])
    batch = encode_batch(untrained.processor, [Sample(np.zeros((32, 32, 3), np.float32),
                                                      "segment " + " ; ".join(NAMES[:3]), target, "segment")])
    labels = batch["labels"][0]
    supervised = labels[labels != -100].tolist()
    assert len(supervised) == len(plan)
    for slot, t in zip(plan, supervised):
        if slot >= 0:
            assert t == slot


def test_loc_slots_only_allow_a_larger_max(untrained):
    import torch

    from chexanatomy_lib.vlm.decode import SegmentGrammar

    tok = untrained.processor.tokenizer
    loc0 = tok.convert_tokens_to_ids("<loc0000>")
    seg0 = tok.convert_tokens_to_ids("<seg000>")
    plan = grammar_plan(tok, ["heart"])
    g = SegmentGrammar(plan, prompt_len=3, loc_start=loc0, seg_start=seg0, pad_id=tok.pad_token_id)
    v = len(tok)
    ids = torch.tensor([[5, 6, 7, loc0 + 700, loc0 + 10]])  # y0 = 700, x0 = 10 generated: next is y1
    out = g(ids, torch.zeros(1, v))
    allowed = torch.isfinite(out[0]).nonzero().flatten() - loc0
    assert allowed.min().item() == 701 and allowed.max().item() == 1023
    first = g(torch.tensor([[5, 6, 7]]), torch.zeros(1, v))  # y0 may not be the last bin
    ok = torch.isfinite(first[0]).nonzero().flatten() - loc0
    assert ok.min().item() == 0 and ok.max().item() == 1022


def _grammar(untrained, loc_rule):
    from chexanatomy_lib.vlm.decode import SegmentGrammar

    tok = untrained.processor.tokenizer
    loc0 = tok.convert_tokens_to_ids("<loc0000>")
    seg0 = tok.convert_tokens_to_ids("<seg000>")
    plan = grammar_plan(tok, ["heart"])
    return SegmentGrammar(plan, prompt_len=3, loc_start=loc0, seg_start=seg0, pad_id=tok.pad_token_id,
                          loc_rule=loc_rule), loc0, len(tok)


def _loc_scores(loc0, v, mass: dict[int, float]):
    import torch

    scores = torch.full((1, v), -30.0)
    for b, p in mass.items():
        scores[0, loc0 + b] = float(np.log(p))
    return scores


def test_median_rule_reads_the_median_loc_bin_not_the_mode(untrained):
    import torch

    # mass 0.3 at bin 100, 0.3 at 200, 0.4 at 300: mode 300, median 200
    mass = {100: 0.3, 200: 0.3, 300: 0.4}
    for rule, expected in (("greedy", 300), ("median", 200)):
        g, loc0, v = _grammar(untrained, rule)
        out = g(torch.tensor([[5, 6, 7]]), _loc_scores(loc0, v, mass))
        assert out[0].argmax().item() - loc0 == expected, rule
    g, loc0, v = _grammar(untrained, "median")
    out = g(torch.tensor([[5, 6, 7]]), _loc_scores(loc0, v, mass))
    assert torch.isfinite(out[0]).sum().item() == 1  # the median is the only choice left


def test_median_rule_respects_the_box_constraint(untrained):
    import torch

    g, loc0, v = _grammar(untrained, "median")
    # y0 = 700 generated; most mass lies below 700 (disallowed for y1): the median of the allowed bins
    mass = {100: 0.5, 650: 0.2, 710: 0.05, 800: 0.05, 900: 0.2}
    out = g(torch.tensor([[5, 6, 7, loc0 + 700, loc0 + 10]]), _loc_scores(loc0, v, mass))
    assert out[0].argmax().item() - loc0 == 900 and torch.isfinite(out[0]).sum().item() == 1
    # seg slots are untouched by the rule: all 128 codes stay allowed
    plan_seg = g.plan.index(SEG)
    ids = torch.tensor([[5, 6, 7] + [loc0 + 1] * plan_seg])
    seg = g(ids, torch.zeros(1, v))
    assert torch.isfinite(seg[0]).sum().item() == 128


def test_median_decoding_is_valid_and_an_unknown_rule_is_refused(untrained):
    decoded = generate_segment(untrained, _images(2), NAMES[:3], constrained=True, loc_rule="median")
    assert invalid_rate(valid_of(decoded)) == 0.0
    with pytest.raises(ValueError, match="loc_rule"):
        generate_segment(untrained, _images(1), NAMES[:1], loc_rule="mean")
