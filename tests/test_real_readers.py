"""Readers of public real chest X-ray sets, on small files written here in each set's
exact public format: the masks written come back, on the right side, with the right
polarity and `annotated` flags, and every bad file stops the read with its name."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageDraw

from chexanatomy_lib.radiograph import letterbox, letterbox_geometry
from chexanatomy_lib.real import readers
from chexanatomy_lib.real.readers import (
    MANIFEST_KEYS,
    READER_OPTIONS,
    STRUCTURES_OF,
    RealSetError,
    load_real_manifest,
    read_real_set,
    rle_decode,
    rle_encode,
)

MANIFESTS = Path(__file__).resolve().parent.parent / "data_manifests"


# --- writers of the public formats ------------------------------------------------

def _box(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def _save_mask(path: Path, mask: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, format=fmt)
    return path


def _save_png16(path: Path, image: np.ndarray) -> Path:
    """A 16-bit grey PNG holding 12-bit values (as Montgomery's 12 gray-level bits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint16)).save(path)
    return path


def _manifest(path: Path, reader: str, root: Path | str, options: dict | None = None, **extra) -> Path:
    data = {"name": f"test_{reader}", "reader": reader, "root": str(root), "licence": "test data",
            "origin": "written by the test", **extra}
    if options is not None:
        data["options"] = options
    path.write_text(yaml.safe_dump(data))
    return path


def _centroid_col(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def _channel(real, name: str) -> int:
    return real.structures.index(name)


# --- geometry and RLE ----------------------------------------------------------------

@pytest.mark.parametrize("shape,size", [((60, 80), 80), ((37, 91), 64), ((2048, 2048), 256), ((4892, 4020), 256)])
def test_letterbox_geometry_matches_letterbox(shape, size):
    assert letterbox_geometry(*shape, size) == letterbox(np.zeros(shape, np.float32), size)[1]


def test_letterbox_mask_is_exact_at_full_size_and_follows_the_area_rule():
    rng = np.random.default_rng(0)
    mask = rng.random((60, 80)) > 0.5
    lb = letterbox_geometry(60, 80, 80)
    out = lb.mask_to_square(mask)
    np.testing.assert_array_equal(out[10:70], mask)  # 10 rows of padding above and below, as letterbox pads
    assert not out[:10].any() and not out[70:].any()
    halves = np.zeros((4, 4), bool)
    halves[0, 0:2] = True  # half of the top-left 2 x 2 block: kept (>= 0.5)
    halves[2, 2] = True  # a quarter of the bottom-right block: dropped
    np.testing.assert_array_equal(letterbox_geometry(4, 4, 2).mask_to_square(halves), [[True, False], [False, False]])
    with pytest.raises(ValueError, match="aspect"):
        lb.mask_to_square(np.zeros((60, 79), bool))
    assert lb.content_mask().sum() == 60 * 80 and not lb.content_mask()[:10].any()


def test_chexmask_rle_documented_example_both_ways():
    mask = np.zeros((3, 4), bool)
    mask.flat[[0, 5, 6, 11]] = True
    assert rle_encode(mask) == "1 1 6 2 12 1"
    np.testing.assert_array_equal(rle_decode("1 1 6 2 12 1", 3, 4), mask)


def test_rle_round_trips_random_masks_and_rejects_runs_past_the_end():
    rng = np.random.default_rng(1)
    for h, w, p in [(17, 23, 0.5), (64, 48, 0.05), (5, 5, 0.0), (5, 5, 1.0), (1, 9, 0.3)]:
        mask = rng.random((h, w)) < p
        text = rle_encode(mask)
        np.testing.assert_array_equal(rle_decode(text, h, w), mask)
    assert rle_encode(np.zeros((4, 4), bool)) == "" and not rle_decode("", 4, 4).any()
    assert rle_encode(np.ones((2, 3), bool)) == "1 6"
    with pytest.raises(ValueError, match="past the end"):
        rle_decode("1 1 12 2", 3, 4)
    with pytest.raises(ValueError, match="pairs"):
        rle_decode("1 1 6", 3, 4)


# --- JSRT + SCR ----------------------------------------------------------------------

JSRT_STEMS = ("JPCLN001", "JPCLN002")
SCR = {"left lung": ((200, 700), (560, 900)), "right lung": ((200, 700), (120, 460)),
       "heart": ((500, 800), (400, 640)), "left clavicle": ((150, 190), (560, 900)),
       "right clavicle": ((150, 190), (120, 460))}


def _scr_mask(folder: str, k: int) -> np.ndarray:
    rows, cols = SCR[folder]
    return _box((1024, 1024), (rows[0] + 8 * k, rows[1] + 8 * k), cols)


def _jsrt(root: Path) -> Path:
    """Two raw JSRT images (air raw 4095 = dark, a dense block raw 0) and their SCR GIFs in two folds."""
    (root / "All247images").mkdir(parents=True)
    for k, stem in enumerate(JSRT_STEMS):
        raw = np.full((2048, 2048), 4095, np.uint16)
        raw[512:1024, 1024:1536] = 0  # dense: must come out white
        raw[1500:1600, 100:200] = 1000 + k
        raw.astype(">u2").tofile(root / "All247images" / f"{stem}.IMG")
        fold = "fold1" if k % 2 == 0 else "fold2"  # JPCLN001 odd -> fold1
        for folder in SCR:
            _save_mask(root / "scratch" / fold / "masks" / folder / f"{stem}.gif", _scr_mask(folder, k), "GIF")
    return root


def test_jsrt_reads_raw_images_inverted_with_their_scr_masks(tmp_path):
    root = _jsrt(tmp_path / "jsrt")
    assert (root / "All247images" / "JPCLN001.IMG").stat().st_size == 8_388_608
    real = read_real_set(_manifest(tmp_path / "jsrt.yaml", "jsrt", root), size=1024, progress=False)
    assert real.image_ids == list(JSRT_STEMS) and len(real) == 2
    assert real.structures == ["lung_field_left", "lung_field_right", "heart", "clavicula_left", "clavicula_right"]
    assert real.images.shape == (2, 1024, 1024) and real.images.dtype == np.float32
    assert real.masks.shape == (2, 5, 1024, 1024) and real.annotated.all()
    # polarity: raw 0 (dense) is white, raw 4095 (air) black; raw 1000 -> 1 - 1000/4095
    assert real.images[0, 300:480, 560:740].min() == pytest.approx(1.0)
    assert real.images[0, :200, :200].max() == pytest.approx(0.0)
    assert real.images[1, 760:790, 60:90].mean() == pytest.approx(1 - 1001 / 4095, abs=1e-5)
    scr = dict(zip(real.structures, SCR))  # registry name -> SCR folder, in channel order
    for k in range(2):
        for s, folder in scr.items():
            np.testing.assert_array_equal(real.masks[k, _channel(real, s)], _scr_mask(folder, k))
        # the patient's left lung lies on the image's right
        assert _centroid_col(real.masks[k, 0]) > 512 > _centroid_col(real.masks[k, 1])
    assert real.original_shapes == [(2048, 2048)] * 2 and real.pixel_spacing_mm == [0.175] * 2
    assert real.letterboxes[0].height == 2048 and real.letterboxes[0].size == 1024
    assert real.source["licence"] == "test data" and real.source["reader"] == "jsrt"


def test_jsrt_truncated_image_is_named_before_any_pixel_is_read(tmp_path, monkeypatch):
    root = _jsrt(tmp_path / "jsrt")
    path = root / "All247images" / "JPCLN002.IMG"
    path.write_bytes(path.read_bytes()[:-1])
    monkeypatch.setattr(readers._JSRT, "read", lambda self, item: pytest.fail("pixels read before the set was checked"))
    with pytest.raises(RealSetError, match=r"JPCLN002\.IMG: 8,388,607 bytes, expected 8,388,608") as err:
        read_real_set(_manifest(tmp_path / "jsrt.yaml", "jsrt", root), size=64, progress=False)
    assert err.value.path == path


def test_jsrt_missing_scr_mask_is_named(tmp_path):
    root = _jsrt(tmp_path / "jsrt")
    (root / "scratch" / "fold2" / "masks" / "heart" / "JPCLN002.gif").unlink()
    with pytest.raises(RealSetError, match=r"fold2/masks/heart/JPCLN002\.gif: missing: the SCR 'heart' mask"):
        read_real_set(_manifest(tmp_path / "jsrt.yaml", "jsrt", root), size=64, progress=False)


# --- Montgomery ------------------------------------------------------------------------

def _montgomery(root: Path) -> dict[str, np.ndarray]:
    """Two 60 x 80 12-bit PNGs; MCUCXR_0001_0's leftMask lies on the image's right, MCUCXR_0002_1's on its left."""
    image_right = _box((60, 80), (10, 50), (45, 70))
    image_left = _box((60, 80), (12, 52), (8, 34))
    truth = {}
    for k, stem in enumerate(("MCUCXR_0001_0", "MCUCXR_0002_1")):
        img = np.zeros((60, 80), np.uint16)
        img[:, :40] = 4095
        _save_png16(root / "CXR_png" / f"{stem}.png", img)
        named_left, named_right = (image_right, image_left) if k == 0 else (image_left, image_right)
        _save_mask(root / "ManualMask" / "leftMask" / f"{stem}.png", named_left)
        _save_mask(root / "ManualMask" / "rightMask" / f"{stem}.png", named_right)
        truth[stem] = image_right  # the patient's left lung, on the image's right
    return truth


def test_montgomery_assigns_sides_by_centroid_and_says_so(tmp_path):
    root = tmp_path / "MontgomerySet"
    truth = _montgomery(root)
    real = read_real_set(_manifest(tmp_path / "m.yaml", "montgomery", root), size=80, progress=False)
    assert real.image_ids == ["MCUCXR_0001_0", "MCUCXR_0002_1"] and real.structures == ["lung_field_left",
                                                                                         "lung_field_right"]
    for k, stem in enumerate(real.image_ids):
        np.testing.assert_array_equal(real.masks[k, 0, 10:70], truth[stem])  # 60 rows padded to 80: 10 above
        assert _centroid_col(real.masks[k, 0]) > 40 > _centroid_col(real.masks[k, 1])
        np.testing.assert_array_equal(real.letterboxes[k].mask_to_original(real.masks[k, 0]), truth[stem])
    assert real.images[0, 10:70, :40].min() == pytest.approx(1.0)  # 12-bit 4095 in a 16-bit PNG is white
    assert real.images[0, 10:70, 41:].max() == 0.0 and not real.images[0, :10].any()
    assert real.original_shapes == [(60, 80)] * 2 and real.pixel_spacing_mm == [0.0875] * 2
    note = next(n for n in real.notes if n.startswith("Montgomery"))
    assert "leftMask lies on the image's right in 1 of 2 images" in note and "MCUCXR_0002_1" in note


def test_montgomery_missing_and_misshapen_masks_are_named(tmp_path):
    root = tmp_path / "MontgomerySet"
    _montgomery(root)
    manifest = _manifest(tmp_path / "m.yaml", "montgomery", root)
    _save_mask(root / "ManualMask" / "rightMask" / "MCUCXR_0002_1.png", np.zeros((60, 79), bool))
    with pytest.raises(RealSetError,
                       match=r"rightMask/MCUCXR_0002_1\.png: mask is 60 x 79 pixels but its image is 60 x 80"):
        read_real_set(manifest, size=32, progress=False)
    (root / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png").unlink()
    with pytest.raises(RealSetError, match=r"leftMask/MCUCXR_0001_0\.png: missing"):
        read_real_set(manifest, size=32, progress=False)


# --- Shenzhen ----------------------------------------------------------------------------

def test_shenzhen_splits_one_mask_into_two_lungs_and_skips_images_without_one(tmp_path):
    root = tmp_path / "ChinaSet_AllFiles"
    shape = (64, 96)
    apart_left, apart_right = _box(shape, (10, 50), (8, 40)), _box(shape, (12, 54), (55, 88))
    touching = _box(shape, (10, 50), (10, 80))  # one component spanning both lungs
    for stem in ("CHNCXR_0001_0", "CHNCXR_0002_1", "CHNCXR_0003_0"):
        _save_mask(root / "CXR_png" / f"{stem}.png", np.ones(shape, bool))
    _save_mask(root / "mask" / "CHNCXR_0001_0_mask.png", apart_left | apart_right)
    _save_mask(root / "mask" / "CHNCXR_0002_1_mask.png", touching)
    real = read_real_set(_manifest(tmp_path / "s.yaml", "shenzhen", root), size=96, progress=False)
    assert real.image_ids == ["CHNCXR_0001_0", "CHNCXR_0002_1"] and real.annotated.all()
    left, right = real.masks[:, 0, 16:80], real.masks[:, 1, 16:80]  # 64 rows padded to 96: 16 above
    np.testing.assert_array_equal(right[0], apart_left)  # the image's left is the patient's right lung
    np.testing.assert_array_equal(left[0], apart_right)
    # touching lungs: split at the bounding box's midline column, (10 + 79 + 1) // 2 = 45
    np.testing.assert_array_equal(right[1], _box(shape, (10, 50), (10, 45)))
    np.testing.assert_array_equal(left[1], _box(shape, (10, 50), (45, 80)))
    assert real.pixel_spacing_mm == [None, None]
    notes = " ".join(real.notes)
    assert "1 of 3 images have no lung mask and were left out (CHNCXR_0003_0)" in notes
    assert "in 1 of 2 the lungs touch" in notes and "CHNCXR_0002_1" in notes


# --- CheXmask ------------------------------------------------------------------------------

def _chexmask_row(image_id: str, left: np.ndarray, right: np.ndarray, heart: np.ndarray, dice: float,
                  height: int | None = None, width: int | None = None) -> dict:
    h, w = left.shape
    return {"Image Index": image_id, "Dice RCA (Max)": dice + 0.05, "Dice RCA (Mean)": dice,
            "Landmarks": "1,2,3,4", "Left Lung": rle_encode(left), "Right Lung": rle_encode(right),
            "Heart": rle_encode(heart), "Height": height or h, "Width": width or w}


def _organs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = shape
    left = _box(shape, (h // 6, 5 * h // 6), (w // 2 + 3, w - 4))  # the patient's left: the image's right
    right = _box(shape, (h // 6, 5 * h // 6), (4, w // 2 - 3))
    heart = _box(shape, (h // 2, 5 * h // 6), (w // 3, 2 * w // 3))  # overlaps the lungs, as in CheXmask
    return left, right, heart


def test_chexmask_masks_only_with_the_quality_filter(tmp_path):
    a, c = _organs((40, 50)), _organs((50, 50))
    rows = [_chexmask_row("c.png", *c, 0.9), _chexmask_row("b.png", *_organs((50, 50)), 0.5),
            _chexmask_row("a.png", *a, 0.75)]
    root = tmp_path / "chexmask"
    root.mkdir()
    with gzip.open(root / "ChestX-Ray8.csv.gz", "wt") as f:
        pd.DataFrame(rows)[["Image Index", "Dice RCA (Max)", "Dice RCA (Mean)", "Landmarks", "Left Lung",
                            "Right Lung", "Heart", "Height", "Width"]].to_csv(f, index=False)
    real = read_real_set(_manifest(tmp_path / "c.yaml", "chexmask", root, {"csv": "ChestX-Ray8.csv.gz"}),
                         size=50, progress=False)
    assert real.images is None and real.image_ids == ["a.png", "c.png"]
    assert real.structures == ["lung_field_left", "lung_field_right", "heart"] and real.annotated.all()
    for k in range(3):
        np.testing.assert_array_equal(real.masks[0, k, 5:45], a[k])  # 40 x 50 padded to 50 x 50: 5 rows above
        np.testing.assert_array_equal(real.masks[1, k], c[k])
    assert real.original_shapes == [(40, 50), (50, 50)] and real.pixel_spacing_mm == [None, None]
    notes = " ".join(real.notes)
    assert "kept 2 of 3 rows with Dice RCA (Mean) >= 0.7 (dropped 1)" in notes
    assert "'Left Lung' lies on the image's right in 2 of 2 images" in notes


def _chexmask_with_images(tmp_path: Path, rows: list[dict], images: dict[str, tuple[int, int]]) -> Path:
    root = tmp_path / "chexmask"
    for name, shape in images.items():
        _save_mask(root / "images" / name, np.ones(shape, bool))
    pd.DataFrame(rows).to_csv(root / "VinDr-CXR.csv", index=False)
    return _manifest(tmp_path / "c.yaml", "chexmask", root, {"csv": "VinDr-CXR.csv", "images_dir": "images",
                                                              "min_dice": 0.7})


def test_chexmask_swapped_height_and_width_are_read_at_the_image_shape(tmp_path):
    organs = _organs((50, 40))  # the image and its masks are 50 x 40 ...
    row = _chexmask_row("x.png", *organs, 0.8, height=40, width=50)  # ... but the row says 40 x 50
    real = read_real_set(_chexmask_with_images(tmp_path, [row], {"x.png": (50, 40)}), size=50, progress=False)
    assert real.images.shape == (1, 50, 50) and real.original_shapes == [(50, 40)]
    for k in range(3):
        np.testing.assert_array_equal(real.masks[0, k, :, 5:45], organs[k])
    assert any("1 rows had Height and Width swapped" in n for n in real.notes)


def test_chexmask_image_of_another_shape_and_rle_past_the_end_are_named(tmp_path):
    row = _chexmask_row("x.png", *_organs((50, 40)), 0.8)
    manifest = _chexmask_with_images(tmp_path, [row], {"x.png": (48, 40)})
    with pytest.raises(RealSetError, match=r"images/x\.png: image is 48 x 40 pixels but its CheXmask row"):
        read_real_set(manifest, size=32, progress=False)
    row["Heart"] = "1 5 1995 10"  # 50 x 40 = 2000 pixels: the run ends at 2004
    manifest = _chexmask_with_images(tmp_path, [row], {"x.png": (50, 40)})
    with pytest.raises(RealSetError, match=r"VinDr-CXR\.csv: row 'x\.png', column 'Heart': RLE run '1995 10' ends "
                                           r"at pixel 2004, past the end"):
        read_real_set(manifest, size=32, progress=False)


# --- VinDr-RibCXR ------------------------------------------------------------------------------

def _rib_polygon(side: str, k: int, h: int, w: int) -> list[dict]:
    x0, x1 = (4, w // 2 - 4) if side == "R" else (w // 2 + 4, w - 4)  # R: the patient's right, the image's left
    y0 = 3 + 5 * (k - 1)
    return [{"x": x0, "y": y0}, {"x": x1, "y": y0 + 1.5}, {"x": x1, "y": y0 + 4}, {"x": x0, "y": y0 + 3}]


def _drawn(points: list[dict], h: int, w: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([(p["x"], p["y"]) for p in points], fill=1, outline=1)
    return np.asarray(canvas) > 0


def test_vindr_ribcxr_fills_polygons_and_flags_missing_ribs(tmp_path):
    root = tmp_path / "VinDr_RibCXR"
    h, w = 64, 80
    for split in ("train", "val"):
        _save_mask(root / "data" / split / "img" / f"VinDr_RibCXR_{split}_000.png", np.zeros((h, w), bool))
        table = {"img": [f"data/{split}/img/VinDr_RibCXR_{split}_000.png" if split == "train"
                         else f"VinDr_RibCXR_{split}_000.png"]}  # relative to root, or to data/val/img/
        for side in "RL":
            for k in range(1, 11):
                table[f"{side}{k}"] = [_rib_polygon(side, k, h, w)]
        if split == "train":
            table["L3"] = ["None"]  # a rib the annotators did not draw
        pd.DataFrame(table).to_json(root / f"Vindr_RibCXR_{split}_mask.json")  # column-oriented, as published
    assert list(json.loads((root / "Vindr_RibCXR_train_mask.json").read_text())["R1"]) == ["0"]
    real = read_real_set(_manifest(tmp_path / "v.yaml", "vindr_ribcxr", root), size=80, progress=False)
    assert real.image_ids == ["VinDr_RibCXR_train_000", "VinDr_RibCXR_val_000"] and len(real.structures) == 20
    l3 = _channel(real, "rib_left_3")
    assert not real.annotated[0, l3] and not real.masks[0, l3].any() and real.annotated[1].all()
    assert real.annotated.sum() == 39
    for n in range(2):
        for side, name in (("R", "right"), ("L", "left")):
            for k in range(1, 11):
                if (n, side, k) == (0, "L", 3):
                    continue
                s = _channel(real, f"rib_{name}_{k}")
                np.testing.assert_array_equal(real.masks[n, s, 8:72], _drawn(_rib_polygon(side, k, h, w), h, w))
        assert _centroid_col(real.masks[n, _channel(real, "rib_right_1")]) < 40  # the patient's right: image's left
    assert any("1 ribs marked 'None' are not annotated" in n for n in real.notes)


def test_vindr_ribcxr_missing_image_is_named(tmp_path):
    root = tmp_path / "VinDr_RibCXR"
    table = {"img": ["data/train/img/VinDr_RibCXR_train_007.png"], **{k: ["None"] for k in readers.RIB_KEYS}}
    root.mkdir()
    pd.DataFrame(table).to_json(root / "Vindr_RibCXR_train_mask.json")
    manifest = _manifest(tmp_path / "v.yaml", "vindr_ribcxr", root, {"splits": ["train"]})
    with pytest.raises(RealSetError, match=r"Vindr_RibCXR_train_mask\.json: image .*VinDr_RibCXR_train_007\.png"
                                           r".* not found"):
        read_real_set(manifest, progress=False)


# --- folder and the manifest --------------------------------------------------------------------

def _folder_set(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """a.png 40 x 60 with heart and left lung field; b.png 60 x 50 with the left lung field only."""
    truth = {"a": {"heart": _box((40, 60), (20, 35), (20, 40)), "lung_field_left": _box((40, 60), (5, 30), (35, 55))},
             "b": {"lung_field_left": _box((60, 50), (10, 50), (28, 46))}}
    for stem, shape in (("a", (40, 60)), ("b", (60, 50))):
        img = np.zeros(shape, np.uint8)
        img[:, : shape[1] // 2] = 255
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        for s, mask in truth[stem].items():
            _save_mask(root / "masks" / s / f"{stem}.png", mask)
    return truth


def test_folder_round_trip_through_a_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("CHEXANATOMY_DATA", str(tmp_path / "data"))
    truth = _folder_set(tmp_path / "data" / "mine")
    manifest = _manifest(tmp_path / "mine.yaml", "folder", "$CHEXANATOMY_DATA/mine",
                         {"images_dir": "images", "masks_dir": "masks", "pixel_spacing_mm": 0.2},
                         description="two images", notes="a test set")
    real = read_real_set(manifest, size=60, progress=False)
    assert real.name == "test_folder" and real.reader == "folder" and real.image_ids == ["a", "b"]
    assert real.structures == ["heart", "lung_field_left"]  # registry order
    np.testing.assert_array_equal(real.annotated, [[True, True], [False, True]])  # b has no heart mask
    np.testing.assert_array_equal(real.masks[0, 0, 10:50], truth["a"]["heart"])
    np.testing.assert_array_equal(real.masks[0, 1, 10:50], truth["a"]["lung_field_left"])
    np.testing.assert_array_equal(real.masks[1, 1, :, 5:55], truth["b"]["lung_field_left"])
    assert not real.masks[1, 0].any()
    assert real.images[1, 30, 5:30].min() == 1.0 and real.images[1, 30, 30:55].max() == 0.0
    assert real.original_shapes == [(40, 60), (60, 50)] and real.pixel_spacing_mm == [0.2, 0.2]
    assert real.source["description"] == "two images" and real.source["root"] == str(tmp_path / "data" / "mine")
    # smaller: the letterbox maps the masks back onto the original pixels
    small = read_real_set(manifest, size=30, progress=False)
    back = small.letterboxes[1].mask_to_original(small.masks[1, 1])
    dice = 2 * (back & truth["b"]["lung_field_left"]).sum() / (back.sum() + truth["b"]["lung_field_left"].sum())
    assert back.shape == (60, 50) and dice > 0.95
    assert read_real_set(manifest, size=30, limit=1, progress=False).image_ids == ["a"]


def test_manifest_limit_keeps_the_first_ids(tmp_path):
    _folder_set(tmp_path / "mine")
    real = read_real_set(_manifest(tmp_path / "m.yaml", "folder", tmp_path / "mine", limit=1), size=16, progress=False)
    assert real.image_ids == ["a"] and real.masks.shape == (1, 2, 16, 16)
    assert any("the first 1 of 2 images" in n for n in real.notes)


def test_folder_errors_name_the_folder_or_file(tmp_path):
    root = tmp_path / "mine"
    _folder_set(root)
    manifest = _manifest(tmp_path / "m.yaml", "folder", root)
    (root / "images" / "c.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(RealSetError, match=r"images/c\.png: not a readable"):
        read_real_set(manifest, size=16, progress=False)
    (root / "images" / "c.png").unlink()
    _save_mask(root / "masks" / "hart" / "a.png", np.ones((40, 60), bool))
    with pytest.raises(RealSetError, match=r"masks/hart: mask folder of an unknown structure: .*closest: heart"):
        read_real_set(manifest, size=16, progress=False)


def test_manifest_errors_name_the_manifest_and_the_key(tmp_path):
    _folder_set(tmp_path / "mine")
    bad = _manifest(tmp_path / "bad.yaml", "folder", tmp_path / "mine", licenze="typo")
    with pytest.raises(RealSetError, match=r"bad\.yaml: unknown key 'licenze'"):
        read_real_set(bad, progress=False)
    bad = _manifest(tmp_path / "bad.yaml", "folder", tmp_path / "mine", {"image_dir": "images"})
    with pytest.raises(RealSetError, match=r"bad\.yaml: unknown option 'image_dir' of the folder reader"):
        read_real_set(bad, progress=False)
    bad.write_text(yaml.safe_dump({"name": "x", "root": str(tmp_path)}))
    with pytest.raises(RealSetError, match=r"bad\.yaml: missing the required key 'reader'"):
        read_real_set(bad, progress=False)
    bad = _manifest(tmp_path / "bad.yaml", "jpeg_folder", tmp_path / "mine")
    with pytest.raises(RealSetError, match=r"unknown reader 'jpeg_folder'"):
        read_real_set(bad, progress=False)
    bad = _manifest(tmp_path / "bad.yaml", "folder", tmp_path / "nowhere")
    with pytest.raises(RealSetError, match=r"bad\.yaml: root .*nowhere is not a folder"):
        read_real_set(bad, progress=False)


@pytest.mark.parametrize("manifest", sorted(MANIFESTS.glob("real_*.yaml")), ids=lambda p: p.stem)
def test_shipped_real_manifests_are_valid(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("CHEXANATOMY_DATA", str(tmp_path))
    data = yaml.safe_load(manifest.read_text())
    assert set(data) <= set(MANIFEST_KEYS) and data["reader"] in STRUCTURES_OF
    assert data.get("licence") and data.get("origin")
    assert set(data.get("options") or {}) <= set(READER_OPTIONS[data["reader"]])
    Path(os.path.expandvars(data["root"])).mkdir(parents=True, exist_ok=True)
    spec = load_real_manifest(manifest)
    assert spec["root"].is_dir() and spec["source"]["licence"] == data["licence"]


def test_every_reader_has_a_shipped_manifest():
    readers_shipped = {yaml.safe_load(p.read_text())["reader"] for p in MANIFESTS.glob("real_*.yaml")}
    assert readers_shipped == set(STRUCTURES_OF) == set(READER_OPTIONS)
