"""Chapter 2's codebook, as the smoke book trained it: round-trip quality and loading."""

import numpy as np
import pandas as pd

from chexanatomy_lib.codec import MaskCodec, MaskVQVAE
from chexanatomy_lib.ct.dataset import ProjectedDataset


def test_our_codec_roundtrip_dice_at_448(smoke_run):
    out = smoke_run.run_dir / "02_token_codec"
    table = pd.read_csv(out / "roundtrip_by_size.csv")
    ours = table[(table["route"] == "ours") & (table["size"] == 448)].set_index("group")["dice"]
    # the ceiling of every VLM score: large structures nearly lossless, thin ones above 0.9
    assert ours["lungs"] >= 0.97 and ours["heart"] >= 0.97
    assert ours["ribs"] >= 0.90
    if "clavicles" in ours:  # clavicles are truncated (left out) in most smoke images
        assert ours["clavicles"] >= 0.90
    # and far above what the location tokens alone give
    box = table[(table["route"] == "box only") & (table["size"] == 448)].set_index("group")["dice"]
    assert (ours["ribs"] - box["ribs"]) > 0.2
    assert set(table["size"]) == {224, 448, 896}


def test_saved_codebook_loads_and_reproduces_its_tokens(smoke_run):
    out = smoke_run.run_dir / "02_token_codec"
    codec = MaskCodec.ours(out / "vqvae")
    record = MaskVQVAE.training_record(out / "vqvae")
    assert record["codebook_used"] > 16 and record["n_train_crops"] > 0
    ds = ProjectedDataset(smoke_run.run_dir / "01_ct_projection" / "dataset")
    i = int(ds.split_indices("test")[0])
    masks = ds.masks_for([i], ["heart"])[0]
    boxes, codes = codec.encode(masks)
    again = MaskCodec.ours(out / "vqvae").encode(masks)
    np.testing.assert_array_equal(codes, again[1])
    assert codes.min() >= 0 and codes.max() < 128
