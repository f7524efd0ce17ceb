"""Real lung masks read in place from an archive in torchxrayvision's format, and the
shape statistics that compare them with projected lung fields."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from chexanatomy_lib.evaluation.domain_gap import compare_sets, mean_mask_dice, shape_statistics
from chexanatomy_lib.real.v7labs import RealMaskError, read_lung_masks


def _png(mask: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _two_lungs(h: int, w: int, big_on_image_left: bool) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[h // 5: 4 * h // 5, w // 10: 4 * w // 10] = True  # the image's left: the patient's right lung
    m[h // 4: 3 * h // 4, 6 * w // 10: 9 * w // 10] = True
    if not big_on_image_left:
        m = m[:, ::-1]
    return m


def _archive(path, entries: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("semantic_masks_v7labs_lungs/", b"")
        for name, data in entries.items():
            z.writestr(f"semantic_masks_v7labs_lungs/{name}", data)
    return path


def test_two_lung_masks_are_kept_split_by_side_and_padded_to_a_square(tmp_path):
    one = np.zeros((60, 80), bool)
    one[10:50, 10:70] = True  # one blob: not two lungs, left out
    tiny = _two_lungs(60, 80, True)
    tiny[:, 40:] = False
    tiny[30, 70] = True  # a speck is no second lung
    path = _archive(tmp_path / "masks.zip", {"a.png": _png(_two_lungs(60, 80, True)),
                                             "b.jpg": _png(_two_lungs(90, 60, False), "JPEG"),
                                             "c.png": _png(one), "d.png": _png(tiny)})
    real = read_lung_masks(size=64, path=path)
    assert real.n_files == 4 and real.names == ["semantic_masks_v7labs_lungs/a.png", "semantic_masks_v7labs_lungs/b.jpg"]
    assert real.masks.shape == real.left.shape == real.right.shape == (2, 64, 64)
    np.testing.assert_array_equal(real.masks, real.left | real.right)
    assert not (real.left & real.right).any()
    for k in range(2):  # the patient's left lung lies on the image's right
        assert np.nonzero(real.left[k])[1].mean() > np.nonzero(real.right[k])[1].mean()
    # a 60 x 80 mask is padded to 80 x 80 (10 rows above and below): nothing in the outer rows
    assert not real.masks[0, :7].any() and not real.masks[0, -7:].any()
    assert "Apache-2.0" in real.source["terms"] and real.source["package"] == "torchxrayvision==1.5.7"


def test_bad_archives_are_named(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(RealMaskError, match=r"junk\.zip: not a readable zip"):
        read_lung_masks(path=tmp_path / "junk.zip")
    path = _archive(tmp_path / "bad.zip", {"a.png": b"\x89PNG broken"})
    with pytest.raises(RealMaskError, match=r"bad\.zip: .*a\.png is not a readable image"):
        read_lung_masks(path=path)


def test_shape_statistics_by_hand():
    m = np.zeros((3, 10, 10), bool)
    m[0, 2:6, 1:9] = True  # 4 x 8 box, full
    m[1, 5, 5] = True
    m[1, 9, 9] = True  # box 5 x 5, two pixels
    stats = shape_statistics(m)
    assert stats.loc[0, "area_fraction"] == pytest.approx(0.32) and stats.loc[0, "box_aspect"] == pytest.approx(0.5)
    assert stats.loc[0, "centroid_y"] == pytest.approx(0.35) and stats.loc[0, "box_fill"] == 1.0
    assert stats.loc[1, "box_fill"] == pytest.approx(2 / 25) and stats.loc[1, "centroid_y"] == pytest.approx(0.7)
    assert stats.loc[2].isna().all()  # an empty mask has no shape


def test_mean_mask_dice_is_one_for_identical_masks_and_falls_with_spread():
    rng = np.random.default_rng(0)
    same = np.zeros((10, 32, 32), bool)
    same[:, 8:24, 8:24] = True
    assert np.allclose(mean_mask_dice(same), 1.0) and len(mean_mask_dice(same)) == 5
    spread = np.zeros((40, 32, 32), bool)
    for m, (dy, dx) in zip(spread, rng.integers(-6, 7, (40, 2))):
        m[8 + dy:24 + dy, 8 + dx:24 + dx] = True
    assert mean_mask_dice(spread).mean() < 0.9
    table = compare_sets({"same": same, "spread": spread})
    assert list(table.columns) == ["same", "spread"] and table.at["masks", "spread"] == 40
    assert table.at["mean-mask Dice", "same"] > table.at["mean-mask Dice", "spread"]
