"""PaliGemma models: tiny random ones, real checkpoints with LoRA, and saving/loading.

One entry point, `load_vlm(model, ...)`:

- ``"tiny"`` / ``"small"`` / ``"base"``: a randomly initialised
  `PaliGemmaForConditionalGeneration` of the real architecture (SigLIP vision tower,
  linear projector, Gemma decoder) with small widths and depths and an offline
  tokenizer, at the preset's input size or ``image_size``. Every weight trains.
- a folder written by :func:`save_vlm` (a model fine-tuned here, e.g. chapter 3's
  image-level control): its weights go on training; for full-weight models
  ``finetune_vision=False`` freezes the vision tower, which is the smoke-scale
  analogue of fine-tuning a pretrained checkpoint with or without LoRA on SigLIP.
- anything else: a real checkpoint (``google/paligemma2-3b-pt-224``, a PaliGemma 1
  id, or a local directory), read from disk or the Hugging Face cache without
  network access, wrapped with LoRA adapters (peft) on the language model's
  q, k, v, o, gate, up and down projections; with ``finetune_vision=True`` also on
  the SigLIP tower's attention and MLP projections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoints import CheckpointError, read_card, write_card

TINY_PRESETS: dict[str, dict[str, int]] = {
    # ~1.6 M parameters at 128 px (most of them in the 2.2k-token embedding)
    "tiny": dict(image_size=128, patch_size=16, vision_hidden=96, vision_layers=3, vision_heads=2,
                 text_hidden=160, text_layers=3, text_heads=2, text_kv_heads=1, vocab_size=1024),
    # ~10 M parameters at 224 px
    "small": dict(image_size=224, patch_size=16, vision_hidden=256, vision_layers=6, vision_heads=4,
                  text_hidden=320, text_layers=6, text_heads=4, text_kv_heads=1, vocab_size=1024),
    # ~37 M parameters at 224 px: chapter 8's third, larger random model
    "base": dict(image_size=224, patch_size=16, vision_hidden=384, vision_layers=8, vision_heads=6,
                 text_hidden=480, text_layers=8, text_heads=6, text_kv_heads=1, vocab_size=1024),
}
LORA_LANGUAGE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_VISION_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class VLM:
    """A PaliGemma model with its processor and how it was built.

    model: `PaliGemmaForConditionalGeneration`, or a peft `PeftModel` around one.
    processor: `PaliGemmaProcessor` (tokenizer with `<loc>`/`<seg>` tokens + image processor).
    base: preset name ("tiny") or the checkpoint id/directory it came from.
    lora: whether the trainable weights are LoRA adapters.
    finetune_vision: whether the vision tower is trained.
    image_size: square input side (px) of the vision tower.
    """

    model: Any
    processor: Any
    base: str
    lora: bool
    finetune_vision: bool
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def core(self):
        """The underlying `PaliGemmaForConditionalGeneration` (unwrapped from peft)."""
        m = self.model
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        return m


# --------------------------------------------------------------------------- tiny models
def build_tiny(preset: str = "tiny", seed: int = 0, corpus: list[str] | None = None,
               image_size: int | None = None) -> VLM:
    """Randomly initialised PaliGemma of preset `preset` with an offline tokenizer.

    The weights are drawn under `torch.manual_seed(seed)`; all of them train
    (vision tower and projector included). `image_size`: input side in pixels (a
    multiple of the patch size, 16); None keeps the preset's.
    """
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    from .tokenizer import build_processor, build_tokenizer

    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose from {sorted(TINY_PRESETS)}")
    p = dict(TINY_PRESETS[preset])
    if image_size is not None:
        if int(image_size) <= 0 or int(image_size) % p["patch_size"]:
            raise ValueError(f"image_size must be a positive multiple of {p['patch_size']} px, got {image_size}")
        p["image_size"] = int(image_size)
    processor = build_processor(build_tokenizer(corpus, p["vocab_size"]), p["image_size"], p["patch_size"])
    tok = processor.tokenizer
    vocab = len(tok)
    image_token = tok.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
                  num_hidden_layers=p["vision_layers"], num_attention_heads=p["vision_heads"],
                  image_size=p["image_size"], patch_size=p["patch_size"], projection_dim=p["text_hidden"],
                  vision_use_head=False)  # NOTE: as in PaliGemma: no pooling head (it would get no gradient)
    text = dict(hidden_size=p["text_hidden"], intermediate_size=4 * p["text_hidden"],
                num_hidden_layers=p["text_layers"], num_attention_heads=p["text_heads"],
                num_key_value_heads=p["text_kv_heads"], head_dim=p["text_hidden"] // p["text_heads"],
                vocab_size=vocab, max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                             vocab_size=vocab, projection_dim=p["text_hidden"],
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
    # NOTE: the processor's <image> id must equal the model's image_token_index.
    config.image_token_id = image_token
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    init_loc_embeddings(model, tok.convert_tokens_to_ids("<loc0000>"))
    _align_generation_config(model, tok)
    return VLM(model, processor, preset, lora=False, finetune_vision=True, image_size=p["image_size"])


def init_loc_embeddings(model, loc_start: int, n_bins: int = 1024) -> None:
    """Give the 1024 `<loc>` embeddings of a random model an ordinal structure.

    Row k becomes sinusoidal features of k (wavelengths from 4 to 4096 bins), scaled
    to the norm of the other rows. NOTE: the embeddings are tied to the output
    layer, so neighbouring bins start with similar logits and a box coordinate is
    learnt as a position on a line instead of 1024 unrelated classes; this only
    changes the initialisation (a pretrained checkpoint keeps its own).
    """
    import math

    import torch

    emb = model.get_input_embeddings().weight
    d = emb.shape[1]
    k = torch.arange(n_bins, dtype=torch.float32)[:, None]
    half = d // 2
    wavelengths = torch.logspace(math.log10(4.0), math.log10(4096.0), half)
    ang = 2 * math.pi * k / wavelengths[None, :]
    feats = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    if feats.shape[1] < d:
        feats = torch.cat([feats, torch.zeros(n_bins, d - feats.shape[1])], dim=1)
    with torch.no_grad():
        ref = emb[:loc_start].norm(dim=1).mean()
        feats = feats / feats.norm(dim=1, keepdim=True) * ref
        emb[loc_start:loc_start + n_bins] = feats.to(emb.dtype)


def _align_generation_config(model, tok) -> None:
    gc = model.generation_config
    gc.pad_token_id = tok.pad_token_id
    gc.eos_token_id = tok.eos_token_id
    gc.bos_token_id = tok.bos_token_id


# --------------------------------------------------------------------------- real checkpoints
def _hf_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def resolve_checkpoint(name_or_path: str, what: str = "PaliGemma checkpoint",
                       required_file: str = "config.json") -> Path:
    """Local directory of a checkpoint: `name_or_path` itself, or its snapshot in the HF cache.

    Never touches the network. Raises `CheckpointError` saying where it looked and
    how to provide the checkpoint.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / required_file).is_file():
            raise CheckpointError(p, f"not a {what} directory (no {required_file} in it)")
        return p
    looked = [f"a local directory {p.resolve()} (does not exist)"]
    if "/" in str(name_or_path) and not str(name_or_path).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            snap = Path(snapshot_download(str(name_or_path), local_files_only=True))
            if (snap / required_file).is_file():
                return snap
            looked.append(f"the Hugging Face cache {_hf_cache_dir()} (snapshot without {required_file})")
        except Exception:  # noqa: BLE001  NOTE: any hub error means "not in the cache"
            looked.append(f"the Hugging Face cache {_hf_cache_dir()} (not there)")
    raise CheckpointError(
        None, f"{what} {str(name_or_path)!r} not found; looked in " + " and ".join(looked) + ". "
        "Provide it as a local directory (pass its path), or on a machine with internet run "
        f"`huggingface-cli download {name_or_path}` (Gemma models need their licence accepted on "
        "huggingface.co first) and copy the cache here (set HF_HOME to it); nothing is downloaded "
        "at run time (HF_HUB_OFFLINE=1)."
    )


def lora_target_regex(finetune_vision: bool) -> str:
    """peft `target_modules` regex: the language model's projections (+ SigLIP's if `finetune_vision`).

    NOTE: plain suffix matching (["q_proj", ...]) also hits SigLIP's attention
    projections, so the regex is anchored on the module path instead.
    """
    lm = r".*language_model.*\.(" + "|".join(LORA_LANGUAGE_MODULES) + r")"
    if not finetune_vision:
        return lm
    vis = r".*vision_tower.*\.(" + "|".join(LORA_VISION_MODULES) + r")"
    return f"(?:{lm})|(?:{vis})"


def _from_pretrained(cls, path, dtype):
    try:
        return cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    except TypeError:  # pragma: no cover - transformers 4.x spells it torch_dtype
        return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)


def load_pretrained(
    name_or_path: str,
    lora_r: int = 16,  # LoRA rank
    lora_alpha: int = 32,  # LoRA scaling numerator
    lora_dropout: float = 0.0,  # dropout on the LoRA input
    finetune_vision: bool = False,  # LoRA also on the SigLIP tower
    adapter: str | None = None,  # a published LoRA adapter (directory or hub id) to load on top
    dtype: str = "auto",  # "auto" (bf16 on CUDA else fp32), "bfloat16", "float32", ...
    trainable: bool = True,  # False: inference only (no new adapters, all weights frozen)
) -> VLM:
    """A real PaliGemma (1 or 2) checkpoint with LoRA adapters.

    Without `adapter`, fresh LoRA adapters (rank `lora_r`) are added to the
    language model's q, k, v, o, gate, up, down projections (and, with
    `finetune_vision`, to SigLIP's q, k, v, out, fc1, fc2). With `adapter`, that
    adapter is loaded on top of its base (trainable if `trainable`).
    """
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    adapter_dir = None
    if adapter is not None:
        adapter_dir = resolve_checkpoint(adapter, "LoRA adapter", "adapter_config.json")
    path = resolve_checkpoint(name_or_path)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        model = _from_pretrained(PaliGemmaForConditionalGeneration, path, torch_dtype)
        processor = PaliGemmaProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(path, f"cannot load a PaliGemma checkpoint from it: {err}") from err
    _align_generation_config(model, processor.tokenizer)
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        cfg = model.peft_config["default"]
        tm = cfg.target_modules
        finetune_vision = "vision_tower" in str(tm) or any("vision" in str(t) for t in (tm or []))
    elif trainable:
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=lora_target_regex(finetune_vision), bias="none")
        model = get_peft_model(model, cfg)
    else:
        for prm in model.parameters():
            prm.requires_grad_(False)
    size = _image_size(model)
    return VLM(model, processor, str(name_or_path), lora=adapter_dir is not None or trainable,
               finetune_vision=finetune_vision, image_size=size,
               info={"checkpoint_dir": str(path), "adapter_dir": str(adapter_dir) if adapter_dir else None})


def _image_size(model) -> int:
    cfg = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    return int(cfg.vision_config.image_size)


def load_vlm(
    model: str = "tiny",  # "tiny", "small", a checkpoint id or a local directory
    seed: int = 0,  # weight init seed of tiny models
    finetune_vision: bool = True,  # train the vision tower (tiny models always do)
    lora_r: int = 16,  # LoRA rank (checkpoints only)
    adapter: str | None = None,  # published LoRA adapter to start from (checkpoints only)
    dtype: str = "auto",  # weight dtype of checkpoints
    image_size: int | None = None,  # input side of a random model (px); None: the preset's
) -> VLM:
    """Build or load the model named by `model` (see module docstring)."""
    if image_size is not None and model not in TINY_PRESETS:
        raise ValueError(f"image_size={image_size} applies to random models only; {model!r} has its own input size")
    if is_saved_vlm(model):
        if adapter is not None:
            raise ValueError(f"{model}: a saved model carries its own weights; adapter must be None")
        vlm = load_saved_vlm(model, trainable=True)
        if not vlm.lora and not finetune_vision:
            freeze_vision_tower(vlm)
        return vlm
    if model in TINY_PRESETS:
        if not finetune_vision:
            raise ValueError(
                f"model={model!r} is randomly initialised, so all of its weights train; "
                "finetune_vision=False applies to pretrained checkpoints only"
            )
        if adapter is not None:
            raise ValueError("a LoRA adapter needs a pretrained base checkpoint, not a tiny random model")
        return build_tiny(model, seed, image_size=image_size)
    return load_pretrained(model, lora_r=lora_r, finetune_vision=finetune_vision, adapter=adapter, dtype=dtype)


def is_saved_vlm(model: str) -> bool:
    """Whether `model` names a folder written by :func:`save_vlm` (it holds a VLM model card)."""
    d = Path(str(model))
    if not (d / "model_card.json").is_file():
        return False
    try:
        read_card(d, kind="vlm")
    except CheckpointError:
        return False
    return True


def freeze_vision_tower(vlm: VLM) -> int:
    """Stop the vision tower of a full-weight model from training; returns how many
    parameters were frozen. The projector and the language model keep training."""
    n = 0
    for name, prm in vlm.model.named_parameters():
        if "vision_tower" in name:
            prm.requires_grad_(False)
            n += prm.numel()
    vlm.finetune_vision = False
    return n


# --------------------------------------------------------------------------- reports
def component_of(param_name: str) -> str:
    """Which part of PaliGemma a parameter belongs to: vision, projector, language model or LoRA."""
    if "lora_" in param_name:
        return "LoRA"
    if "vision_tower" in param_name:
        return "vision tower"
    if "multi_modal_projector" in param_name:
        return "projector"
    return "language model"


def trainable_parameters(model) -> list[dict[str, Any]]:
    """Per component: total and trainable parameter counts (tied weights counted once).

    Returns rows ``{"component", "parameters", "trainable", "trainable %"}`` for
    vision tower, projector, language model, LoRA, and a final "total" row.
    """
    order = ["vision tower", "projector", "language model", "LoRA"]
    total = {c: 0 for c in order}
    train = {c: 0 for c in order}
    for name, prm in model.named_parameters():
        c = component_of(name)
        total[c] += prm.numel()
        train[c] += prm.numel() if prm.requires_grad else 0
    rows = []
    for c in order + ["total"]:
        t = sum(total.values()) if c == "total" else total[c]
        tr = sum(train.values()) if c == "total" else train[c]
        rows.append({"component": c, "parameters": t, "trainable": tr,
                     "trainable %": 100.0 * tr / t if t else 0.0})
    return rows


# --------------------------------------------------------------------------- on disk
def save_vlm(vlm: VLM, out_dir: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write `vlm` to `out_dir`: full weights (tiny) or the LoRA adapter (checkpoints),
    the processor, and `model_card.json` = ``{"kind": "vlm", ...}`` merged with `card`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vlm.lora:
        vlm.model.save_pretrained(out / "adapter")
    else:
        vlm.core.save_pretrained(out / "model")
    vlm.processor.save_pretrained(out / "processor")
    meta = {"format": 1, "base": vlm.base, "lora": vlm.lora,
            "finetune_vision": vlm.finetune_vision, "image_size": vlm.image_size,
            "weights": "adapter" if vlm.lora else "model", "processor": "processor"}
    meta.update(card or {})
    write_card(out, "vlm", meta)
    return out


def load_saved_vlm(ckpt_dir: str | Path, trainable: bool = False, base_override: str | None = None) -> VLM:
    """Load a directory written by `save_vlm` (weights, processor and card)."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    d = Path(ckpt_dir)
    card = read_card(d, kind="vlm")
    if card.get("lora"):
        base = base_override or card["base"]
        vlm = load_pretrained(base, adapter=str(d / card.get("weights", "adapter")), trainable=trainable)
    else:
        wdir = d / card.get("weights", "model")
        if not (wdir / "config.json").is_file():
            raise CheckpointError(wdir, "missing model weights (no config.json)")
        model = PaliGemmaForConditionalGeneration.from_pretrained(wdir, local_files_only=True)
        if not trainable:
            for prm in model.parameters():
                prm.requires_grad_(False)
        processor = PaliGemmaProcessor.from_pretrained(d / card.get("processor", "processor"),
                                                       local_files_only=True)
        _align_generation_config(model, processor.tokenizer)
        vlm = VLM(model, processor, card["base"], lora=False, finetune_vision=True,
                  image_size=int(card["image_size"]))
    vlm.info["card"] = card
    return vlm


def compile_layers(model) -> int:
    """Compile each decoder and vision-encoder layer of a PaliGemma model in place
    (``torch.compile``, regional); returns how many layers.

    NOTE: identical layers share the compiled code, so compiling takes about 40 s
    on an H100 whatever the depth; it fuses the element-wise work around the
    matrix products (Gemma's fp32 RMSNorm, GELU, soft-capping, residuals,
    LoRA's scale-and-add), which otherwise costs a large share of a LoRA step
    (benchmarks/bench_vlm_gpu.py). Meant for GPUs; the rest of the model stays
    eager.
    """
    import torch
    import torch._dynamo.config as dynamo_config

    # NOTE: layers differ in integer attributes (their index, sliding or global
    # attention); by default each difference is a recompilation, and past the
    # recompile limit (8) the remaining layers silently run eager. Integers on
    # modules are therefore left unspecialised and the limit raised above the depth.
    if hasattr(dynamo_config, "allow_unspec_int_on_nn_module"):
        dynamo_config.allow_unspec_int_on_nn_module = True
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, max(64, getattr(dynamo_config, limit)))
    for limit in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, max(512, getattr(dynamo_config, limit)))
    n = 0
    for name, mod in model.named_modules():
        if name.endswith(".layers") and isinstance(mod, torch.nn.ModuleList):
            for layer in mod:
                layer.compile()
                n += 1
    return n
