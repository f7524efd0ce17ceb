"""Location tokens, prompts, targets and the output parser."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from chexanatomy_lib.codec import (
    box_to_loc_tokens, format_prompt, format_target, loc_tokens_to_box, mask_to_box, parse_output,
    pixel_box_to_tokens, tokens_to_pixel_box,
)


def test_box_tokens_follow_big_vision_binning():
    assert box_to_loc_tokens([0.0, 0.5, 1.0, 0.25]) == "<loc0000><loc0512><loc1023><loc0256>"
    # values outside [0, 1] clip to the end bins
    assert box_to_loc_tokens([-0.2, 0.0, 1.7, 1.0]) == "<loc0000><loc0000><loc1023><loc1023>"


@given(st.lists(st.integers(0, 1023), min_size=4, max_size=4))
def test_tokens_to_box_to_tokens_is_identity(bins):
    text = "".join(f"<loc{b:04d}>" for b in bins)
    box = loc_tokens_to_box(text)
    assert np.all((box >= 0) & (box <= 1))
    assert box_to_loc_tokens(box) == text


@pytest.mark.parametrize("size", [224, 256, 448, 896, 1000])
def test_pixel_box_roundtrip_moves_each_edge_at_most_one_pixel_plus_one_bin(size):
    rng = np.random.default_rng(size)
    bin_px = size / 1023
    for _ in range(500):
        y0, y1 = sorted(rng.choice(size + 1, 2, replace=False))
        x0, x1 = sorted(rng.choice(size + 1, 2, replace=False))
        back = tokens_to_pixel_box(pixel_box_to_tokens((y0, x0, y1, x1), size, size), size, size)
        assert np.all(np.abs(np.subtract(back, (y0, x0, y1, x1))) <= 1 + bin_px)


def test_mask_to_box_uses_pixel_edges():
    m = np.zeros((10, 20), bool)
    m[3, 7] = True  # one pixel has a one-pixel box
    np.testing.assert_allclose(mask_to_box(m), [0.3, 0.35, 0.4, 0.4])
    m[5:8, 2] = True
    np.testing.assert_allclose(mask_to_box(m), [0.3, 0.1, 0.8, 0.4])
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((4, 4), bool))


def test_prompt_and_target_formats():
    assert format_prompt("segment", ["left lung", "heart"]) == "segment left lung ; heart"
    assert format_prompt("detect", ["heart"]) == "detect heart"
    codes = np.arange(16)
    t = format_target("segment", [("left lung", [0.1, 0.2, 0.5, 0.6], codes), ("heart", [0, 0, 1, 1], codes[::-1])])
    seg = "".join(f"<seg{c:03d}>" for c in codes)
    assert t.startswith("<loc0102><loc0205><loc0512><loc0614>" + seg + " left lung ; <loc0000>")
    assert t.endswith("<seg000> heart")
    assert format_target("detect", [("heart", [0, 0, 1, 1], None)]) == "<loc0000><loc0000><loc1023><loc1023> heart"
    with pytest.raises(ValueError):
        format_prompt("caption", ["heart"])
    with pytest.raises(ValueError):
        format_target("segment", [("a ; b", [0, 0, 1, 1], codes)])


def test_parse_output_roundtrip_and_reasons():
    codes = np.arange(16) * 7
    text = format_target("segment", [("left lung", [0.1, 0.2, 0.5, 0.6], codes), ("heart", [0.3, 0.3, 0.6, 0.7], codes)])
    out = parse_output(text + "<eos>")
    assert [p.name for p in out] == ["left lung", "heart"] and all(p.valid for p in out)
    np.testing.assert_array_equal(out[0].codes, codes)
    np.testing.assert_allclose(out[0].box, np.round(np.array([0.1, 0.2, 0.5, 0.6]) * 1023) / 1023)

    loc = "<loc0100><loc0100><loc0200><loc0200>"
    seg = "<seg001>" * 16
    reason = lambda s, **kw: parse_output(s, **kw)[0].reason  # noqa: E731
    assert reason(loc + "<seg001>" * 3 + " heart").startswith("missing tokens")
    assert reason("<loc0100><loc0100><loc1500><loc0200>" + seg + " heart").startswith("out of range")
    assert reason(loc + "<seg001>" * 15 + "<seg200> heart").startswith("out of range")
    assert reason("<loc0200><loc0100><loc0100><loc0200>" + seg + " heart") == "ymax<=ymin"
    assert reason("<loc0100><loc0200><loc0200><loc0100>" + seg + " heart") == "xmax<=xmin"
    assert reason(loc + seg + " spleen", known_names={"heart"}).startswith("unknown name")
    assert reason(loc + seg + "<seg001> heart").startswith("trailing junk")
    assert reason(loc + seg + " heart <loc0001>").startswith("trailing junk")
    assert parse_output(loc + seg + " Heart", known_names={"heart"})[0].valid
    # detect: 4 loc tokens and a name
    det = parse_output(loc + " heart", task="detect")[0]
    assert det.valid and det.codes is None


def test_parse_output_with_expected_names_keeps_order_and_flags_missing():
    codes = np.zeros(16, int)
    text = format_target("segment", [("heart", [0.3, 0.3, 0.6, 0.7], codes), ("left lung", [0.1, 0.2, 0.5, 0.6], codes)])
    out = parse_output(text, expected=["left lung", "trachea", "heart"])
    assert [p.name for p in out] == ["left lung", "trachea", "heart"]
    assert [p.valid for p in out] == [True, False, True]
    assert out[1].reason == "not in output"


_pieces = st.one_of(
    st.integers(0, 1100).map(lambda b: f"<loc{b:04d}>"),
    st.integers(0, 140).map(lambda c: f"<seg{c:03d}>"),
    st.sampled_from([" heart", " left lung", " ; ", ";", " ", "<eos>", "<pad>", "<loc>", "<seg12", "loc0001>",
                     "<loc-001>", "<loc00001>", "\n", "<unk>", " é", "<<loc0001>>"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_pieces, max_size=60), st.sampled_from(["segment", "detect"]))
def test_parse_output_never_raises_on_token_soup(pieces, task):
    for inst in parse_output("".join(pieces), task=task, expected=["heart", "left lung"], known_names={"heart"}):
        _check_instance(inst)
    for inst in parse_output("".join(pieces), task=task):
        _check_instance(inst)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_output_never_raises_on_arbitrary_text(text):
    for inst in parse_output(text):
        _check_instance(inst)


def _check_instance(inst):
    if inst.box is not None:
        assert inst.box.shape == (4,) and np.all((inst.box >= 0) & (inst.box <= 1))
    if inst.codes is not None:
        assert inst.codes.shape == (16,) and inst.codes.min() >= 0 and inst.codes.max() < 128
    if inst.valid:
        assert inst.reason is None and inst.box[2] > inst.box[0] and inst.box[3] > inst.box[1]
    else:
        assert isinstance(inst.reason, str) and inst.reason
