"""The mask VQ-VAE: official checkpoint loading, checked against a plain NumPy implementation."""

import json

import numpy as np
import pytest
import torch

from chexanatomy_lib.codec import CheckpointError, MaskVQVAE, VQVAEConfig


# ----------------------------------------------------------------- independent NumPy model
def np_conv_same(x, w, b, stride):
    """TensorFlow 'SAME' conv. x [N, C, H, W]; w [O, C, k, k] (PyTorch layout)."""
    n, c, h, wd = x.shape
    k = w.shape[-1]
    out_h, out_w = -(-h // stride), -(-wd // stride)
    ph = max((out_h - 1) * stride + k - h, 0)
    pw = max((out_w - 1) * stride + k - wd, 0)
    xp = np.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    out = np.zeros((n, w.shape[0], out_h, out_w))
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, :, ky:ky + stride * out_h:stride, kx:kx + stride * out_w:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx])
    return out + b[None, :, None, None]


def np_conv_transpose(x, w, b):
    """Transposed conv, kernel 4, stride 2, padding 1. w [C, O, 4, 4] (PyTorch layout)."""
    n, c, h, wd = x.shape
    full = np.zeros((n, w.shape[1], 2 * h + 2, 2 * wd + 2))
    for ky in range(4):
        for kx in range(4):
            full[:, :, ky:ky + 2 * h:2, kx:kx + 2 * wd:2] += np.einsum("nchw,co->nohw", x, w[:, :, ky, kx])
    return full[:, :, 1:-1, 1:-1] + b[None, :, None, None]


def relu(x):
    return np.maximum(x, 0)


def np_resblock(ck, x, name):
    h = relu(np_conv_same(x, ck[name + ".0.weight"], ck[name + ".0.bias"], 1))
    h = relu(np_conv_same(h, ck[name + ".2.weight"], ck[name + ".2.bias"], 1))
    return x + np_conv_same(h, ck[name + ".4.weight"], ck[name + ".4.bias"], 1)


def np_encode(ck, masks):
    x = 2.0 * (masks[:, None].astype(np.float64) - 0.5)
    for i in (0, 2, 4, 6):
        x = relu(np_conv_same(x, ck[f"encoder.{i}.weight"], ck[f"encoder.{i}.bias"], 2))
    x = np_resblock(ck, x, "encoder.8.net")
    x = np_resblock(ck, x, "encoder.9.net")
    x = np_conv_same(x, ck["encoder.10.weight"], ck["encoder.10.bias"], 1)
    flat = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])  # NHWC, row-major cells
    emb = ck["_vq_vae._embedding"]
    d = (flat ** 2).sum(1, keepdims=True) + (emb ** 2).sum(1) - 2 * flat @ emb.T
    return d.argmin(1).reshape(len(masks), 16), d


def np_decode(ck, codes):
    emb = ck["_vq_vae._embedding"]
    x = emb[codes.reshape(-1)].reshape(len(codes), 4, 4, -1).transpose(0, 3, 1, 2)
    x = relu(np_conv_same(x, ck["decoder.0.weight"], ck["decoder.0.bias"], 1))
    x = np_resblock(ck, x, "decoder.2.net")
    x = np_resblock(ck, x, "decoder.3.net")
    for i in (4, 6, 8, 10):
        x = relu(np_conv_transpose(x, ck[f"decoder.{i}.weight"], ck[f"decoder.{i}.bias"]))
    return np_conv_same(x, ck["decoder.12.weight"], ck["decoder.12.bias"], 1)[:, 0]


def make_checkpoint(rng, enc=(16, 32, 64, 128), k=4, dim=64, dec=(128, 128, 64, 32, 16)):
    """A random checkpoint with the official key names and PyTorch-layout shapes."""
    ck = {}
    cin = 1
    for i, c in zip((0, 2, 4, 6), enc):
        ck[f"encoder.{i}.weight"] = rng.normal(0, (2 / (cin * k * k)) ** 0.5, (c, cin, k, k))
        ck[f"encoder.{i}.bias"] = rng.normal(0, 0.05, c)
        cin = c
    for blk, width in (("encoder.8.net", enc[-1]), ("encoder.9.net", enc[-1]),
                       ("decoder.2.net", dec[0]), ("decoder.3.net", dec[0])):
        for j, kk in zip((0, 2, 4), (3, 3, 1)):
            ck[f"{blk}.{j}.weight"] = rng.normal(0, 0.5 * (1 / (width * kk * kk)) ** 0.5, (width, width, kk, kk))
            ck[f"{blk}.{j}.bias"] = rng.normal(0, 0.02, width)
    ck["encoder.10.weight"] = rng.normal(0, (1 / enc[-1]) ** 0.5, (dim, enc[-1], 1, 1))
    ck["encoder.10.bias"] = rng.normal(0, 0.02, dim)
    ck["_vq_vae._embedding"] = rng.normal(0, 1.0, (128, dim))
    ck["decoder.0.weight"] = rng.normal(0, (2 / dim) ** 0.5, (dec[0], dim, 1, 1))
    ck["decoder.0.bias"] = rng.normal(0, 0.02, dec[0])
    for i, (a, b) in zip((4, 6, 8, 10), zip(dec[:-1], dec[1:])):
        ck[f"decoder.{i}.weight"] = rng.normal(0, (2 / (a * 4)) ** 0.5, (a, b, 4, 4))
        ck[f"decoder.{i}.bias"] = rng.normal(0, 0.02, b)
    ck["decoder.12.weight"] = rng.normal(0, (1 / dec[-1]) ** 0.5, (1, dec[-1], 1, 1))
    ck["decoder.12.bias"] = rng.normal(0, 0.02, 1)
    ck["_vq_vae._ema_cluster_size"] = np.ones(128)  # extra keys in a file are ignored
    return {k_: v.astype(np.float32) for k_, v in ck.items()}


def blob_masks(rng, n):
    yy, xx = np.mgrid[0:64, 0:64]
    out = []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(16, 48), rng.uniform(16, 48), rng.uniform(5, 20), rng.uniform(5, 20)
        out.append(np.clip(1.5 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2, 0, 1))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("enc_kernel", [4, 3])  # 3: TensorFlow's asymmetric 'SAME' padding
def test_official_loader_matches_numpy_implementation(tmp_path, enc_kernel):
    rng = np.random.default_rng(enc_kernel)
    ck = make_checkpoint(rng, k=enc_kernel)
    path = tmp_path / "vae-oid.npz"
    np.savez(path, **ck)
    model = MaskVQVAE.load_official_npz(path)
    assert model.config.enc_kernel == enc_kernel and model.config.embedding_dim == 64
    masks = blob_masks(rng, 6)
    ref_codes, dist = np_encode(ck, masks)
    codes = model.encode(masks).numpy()
    assert codes.dtype == np.int64 and codes.shape == (6, 16)
    # Equal codes, except where two codebook entries are (numerically) equally near.
    d_sorted = np.sort(dist, axis=1)
    clear = (d_sorted[:, 1] - d_sorted[:, 0]) > 1e-3 * (1 + np.abs(d_sorted[:, 0]))
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(codes.reshape(-1)[clear], ref_codes.reshape(-1)[clear])
    test_codes = rng.integers(0, 128, (5, 16))
    ref_out = np_decode(ck, test_codes)
    out = model.decode(test_codes, clip=False).numpy()
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4 * np.abs(ref_out).max())
    assert np.abs(model.decode(test_codes).numpy()).max() <= 1.0


def test_official_loader_names_missing_key_and_wrong_shape(tmp_path):
    rng = np.random.default_rng(0)
    ck = make_checkpoint(rng)
    bad = dict(ck)
    del bad["decoder.6.bias"]
    np.savez(tmp_path / "missing.npz", **bad)
    with pytest.raises(CheckpointError, match=r"missing\.npz.*decoder\.6\.bias"):
        MaskVQVAE.load_official_npz(tmp_path / "missing.npz")
    bad = dict(ck)
    bad["decoder.12.weight"] = np.zeros((1, 7, 1, 1), np.float32)
    np.savez(tmp_path / "shape.npz", **bad)
    with pytest.raises(CheckpointError, match=r"shape\.npz.*decoder\.12\.weight.*\(1, 7, 1, 1\)"):
        MaskVQVAE.load_official_npz(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=r"junk\.npz"):
        MaskVQVAE.load_official_npz(tmp_path / "junk.npz")
    with pytest.raises(CheckpointError, match="no such file"):
        MaskVQVAE.load_official_npz(tmp_path / "absent.npz")


def test_save_and_load_reproduce_codes_and_record(tmp_path):
    cfg = VQVAEConfig(enc_channels=(8, 16, 32, 32), embedding_dim=16, dec_channels=(32, 32, 16, 8, 8))
    torch.manual_seed(0)
    model = MaskVQVAE(cfg)
    model._vq_vae._embedding.normal_()
    model.save(tmp_path / "vq", record={"steps": 3, "codebook_used": 5})
    back = MaskVQVAE.load(tmp_path / "vq")
    assert back.config == cfg
    masks = blob_masks(np.random.default_rng(1), 4)
    np.testing.assert_array_equal(back.encode(masks).numpy(), model.encode(masks).numpy())
    assert MaskVQVAE.training_record(tmp_path / "vq")["codebook_used"] == 5
    (tmp_path / "vq" / "config.json").write_text(json.dumps({"enc_channels": "oops"}))
    with pytest.raises(CheckpointError, match="config.json"):
        MaskVQVAE.load(tmp_path / "vq")
    with pytest.raises(CheckpointError, match="missing config.json"):
        MaskVQVAE.load(tmp_path)


def test_training_lowers_the_reconstruction_error_and_records_codebook_use():
    from chexanatomy_lib.codec import VQVAETrainConfig, train_vqvae

    crops = blob_masks(np.random.default_rng(0), 256)
    cfg = VQVAEConfig(enc_channels=(8, 8, 16, 16), embedding_dim=16, dec_channels=(16, 16, 8, 8, 8))
    model, record = train_vqvae(crops, cfg, VQVAETrainConfig(steps=60, batch_size=32, lr=3e-3, restart_every=10, threads=1),
                                progress=False)
    mse = [h["recon_mse"] for h in record["history"]]
    assert np.mean(mse[-2:]) < 0.6 * mse[0]
    assert 1 < record["codebook_used"] <= 128 and sum(record["code_counts"]) == 256 * 16
    codes = model.encode(crops[:8]).numpy()
    assert codes.shape == (8, 16) and codes.min() >= 0 and codes.max() < 128
    with pytest.raises(ValueError, match=r"\[N, 64, 64\]"):
        train_vqvae(np.zeros((4, 32, 32), np.float32), cfg, progress=False)


def test_weighted_sampling_and_dice_term():
    """Sampling weights pick the crops a batch draws from; a Dice term trains; bad weights are refused."""
    from chexanatomy_lib.codec import VQVAETrainConfig, train_vqvae

    crops = blob_masks(np.random.default_rng(1), 64)
    crops[32:] = 0.0  # second half empty: with zero weight it is never drawn
    cfg = VQVAEConfig(enc_channels=(8, 8, 16, 16), embedding_dim=16, dec_channels=(16, 16, 8, 8, 8))
    tc = VQVAETrainConfig(steps=30, batch_size=16, lr=3e-3, restart_every=10, dice_weight=1.0, threads=1)
    weights = np.r_[np.ones(32), np.zeros(32)]
    _, record = train_vqvae(crops, cfg, tc, progress=False, weights=weights)
    assert record["weighted_sampling"] and record["train_config"]["dice_weight"] == 1.0
    assert all(np.isfinite(h["recon_mse"]) for h in record["history"])
    from chexanatomy_lib.codec.vqvae_training import draw_batch

    gen = torch.Generator().manual_seed(0)
    idx = draw_batch(64, 4000, gen, torch.as_tensor(np.r_[np.zeros(32), np.ones(16), 3 * np.ones(16)]))
    assert idx.min() >= 32  # zero weight: never drawn
    assert 2.5 < (idx >= 48).sum().item() / (idx < 48).sum().item() < 3.5  # proportional to the weights
    for bad in (np.ones(3), np.zeros(64), -np.ones(64), np.full(64, np.nan)):
        with pytest.raises(ValueError, match="weights"):
            train_vqvae(crops, cfg, tc, progress=False, weights=bad)


def test_interrupted_codebook_training_resumes_to_the_same_weights(tmp_path):
    """The training loop saves the codebook statistics and the batch generator with each
    state, so a run stopped during the quantised phase and resumed ends where an
    uninterrupted one does."""
    from chexanatomy_lib.codec import VQVAETrainConfig, train_vqvae

    crops = blob_masks(np.random.default_rng(2), 96)
    cfg = VQVAEConfig(enc_channels=(8, 8, 16, 16), embedding_dim=8, dec_channels=(16, 16, 8, 8, 8), num_embeddings=32)
    tc = VQVAETrainConfig(steps=40, batch_size=16, lr=3e-3, restart_every=5, threads=1, seed=4)
    weights = np.linspace(0.5, 1.5, 96)
    full, rec_full = train_vqvae(crops, cfg, tc, progress=False, weights=weights)
    _, rec_part = train_vqvae(crops, cfg, tc, progress=False, weights=weights, checkpoint_dir=tmp_path,
                              stop_after=23)
    assert not rec_part["finished"]
    resumed, rec = train_vqvae(crops, cfg, tc, progress=False, weights=weights, checkpoint_dir=tmp_path)
    assert rec["finished"] and rec["history"] == rec_full["history"]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rec["code_counts"] == rec_full["code_counts"]


def test_decode_in_chunks_equals_the_decoder_on_the_whole_batch():
    torch.manual_seed(0)
    model = MaskVQVAE(VQVAEConfig(enc_channels=(8, 16, 32, 64), embedding_dim=32,
                                  dec_channels=(32, 32, 16, 8, 8))).eval()
    codes = torch.randint(0, 128, (150, 16))  # more than two chunks, the last one short
    with torch.no_grad():
        ref = model.decode_latent(model.embed(codes))
    torch.testing.assert_close(model.decode(codes, clip=False), ref, rtol=1e-5, atol=1e-6)
    assert model.decode(codes[:0]).shape == (0, 64, 64)
