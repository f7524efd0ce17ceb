"""Training throughput of the PaliGemma 2 3B architecture with LoRA on one GPU.

    python benchmarks/bench_vlm_gpu.py [--sizes 224 448] [--batch 24 8] [--steps 10] [--out FILE] [--revision SHA]
        [--target-logits-only] [--compile layers] [--profile FILE]

The model is built from its configuration with random weights (no checkpoint is
needed or downloaded): Gemma 2 2B text decoder (26 layers, width 2304, 8 heads of
256, 4 KV heads) and the SigLIP So400m/14 vision tower (27 layers, width 1152),
bf16. LoRA r=16 sits on the language model's q, k, v, o, gate, up and down
projections only (``chexanatomy_lib.vlm.model.lora_target_regex``), the vision
tower is frozen. Each sample is one image, the prompt ``segment <name>`` and a
target of 4 ``<loc>`` + 16 ``<seg>`` tokens, the name and ``<eos>``.

MFU = (4 N + attention FLOPs per token) x tokens/s / 989 TFLOP/s (H100 dense
bf16), with N all parameters (frozen base: forward 2N, backward through the
activations 2N) and attention FLOPs per token 12 x layers x sequence x
(heads x head dim) for the language model; tokens are all sequence positions
(image tokens included).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16
PROMPT_TOKENS = 6  # "segment left lung" + "\n" after <bos>, typical length
TARGET_TOKENS = 4 + 16 + 3 + 1  # loc x4, seg x16, name, <eos>


def build_model(image_size: int, device: str = "cuda", tiny: bool = False):
    """PaliGemma 2 3B architecture, random weights, bf16; ``tiny`` shrinks widths and depths
    (same code path) for a functional check on the CPU."""
    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    d = 16 if tiny else 1  # width divisor
    text = Gemma2Config(
        vocab_size=257216, hidden_size=2304 // d, intermediate_size=9216 // d, num_hidden_layers=2 if tiny else 26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256 // d, query_pre_attn_scalar=256 // d,
        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    )
    vision = SiglipVisionConfig(
        hidden_size=1152 // d, intermediate_size=4304 // d, num_hidden_layers=2 if tiny else 27, num_attention_heads=4 if tiny else 16,
        patch_size=14, image_size=image_size, projection_dim=2304 // d,
    )
    cfg = PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=2304 // d,
                          image_token_index=257152, vocab_size=257216)
    cfg.text_config.num_image_tokens = (image_size // 14) ** 2
    torch.manual_seed(0)
    with torch.device(device):
        model = PaliGemmaForConditionalGeneration(cfg)
    return model.to(torch.bfloat16), cfg


def measure(image_size: int, batch: int, steps: int, warmup: int = 3, device: str = "cuda", tiny: bool = False,
            target_logits_only: bool = False, compile: str = "none", profile: str | None = None,
            lora_precision: str = "fp32") -> dict:
    from peft import LoraConfig, get_peft_model

    from chexanatomy_lib.vlm.model import lora_target_regex

    model, cfg = build_model(image_size, device, tiny)
    n_params = sum(p.numel() for p in model.parameters())
    # NOTE: lora_precision: "fp32" = peft's default (adapter weights in fp32, each LoRA
    # input cast to fp32); "autocast" = fp32 adapter weights under bf16 autocast with
    # peft's input casting off (LoRA products in bf16, fp32 master weights, as
    # Accelerate's bf16 mixed precision runs them); "bf16" = adapter weights in bf16.
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_regex(False)),
                           autocast_adapter_dtype=lora_precision != "bf16")
    if compile == "layers":
        from chexanatomy_lib.vlm.model import compile_layers

        compile_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vision_trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "vision_tower" in n)
    n_img = (image_size // 14) ** 2
    seq = n_img + 1 + PROMPT_TOKENS + TARGET_TOKENS
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(10, 256000, (batch, seq), device=device, generator=g)
    ids[:, :n_img] = 257152
    ids[:, n_img] = 2  # <bos>
    ids[:, -TARGET_TOKENS:-4] = torch.randint(256000, 257152, (batch, 20), device=device, generator=g)  # loc + seg
    ids[:, -1] = 1  # <eos>
    token_type = torch.zeros_like(ids)
    token_type[:, -TARGET_TOKENS:] = 1
    labels = ids.masked_fill(token_type == 0, -100)
    pixels = torch.randn(batch, 3, image_size, image_size, device=device, generator=g).to(torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.01,
                            betas=(0.9, 0.999))
    model.train()

    import contextlib

    from peft.helpers import disable_input_dtype_casting

    def forward_context():
        if lora_precision != "autocast":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type=device, dtype=torch.bfloat16))
        stack.enter_context(disable_input_dtype_casting(model))
        return stack

    def forward() -> torch.Tensor:
        if target_logits_only:
            # The loss needs logits at the positions that predict the target only: skip the
            # 257k-way head (and its fp32 logits) on the image and prompt positions.
            out = model(input_ids=ids, pixel_values=pixels, token_type_ids=token_type, logits_to_keep=TARGET_TOKENS + 1)
            logits = out.logits[:, :-1].float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, -TARGET_TOKENS:].reshape(-1))
        return model(input_ids=ids, pixel_values=pixels, token_type_ids=token_type, labels=labels).loss

    def step() -> float:
        with forward_context():
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_warm = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t_warm
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            sync()
        Path(profile).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    tc = cfg.text_config
    attn = 12 * tc.num_hidden_layers * seq * tc.num_attention_heads * tc.head_dim
    tokens_per_s = batch * seq / dt
    mfu = (4 * n_params + attn) * tokens_per_s / PEAK_BF16_FLOPS
    res = {
        "image_size": image_size, "batch": batch, "sequence": seq, "image_tokens": n_img,
        "params_total": n_params, "params_trainable": trainable, "params_trainable_vision": vision_trainable,
        "step_s": dt, "samples_per_s": batch / dt, "tokens_per_s": tokens_per_s,
        "target_tokens_per_s": batch * TARGET_TOKENS / dt, "attention_flops_per_token": attn,
        "mfu": mfu, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "last_loss": loss,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "target_logits_only": target_logits_only,
        "compile": compile, "warmup_s": warmup_s, "lora_precision": lora_precision,
    }
    print(json.dumps(res), flush=True)
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--batch", type=int, nargs="+", default=[24, 8])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="records/benchmarks/vlm_gpu.json")
    ap.add_argument("--revision", default=None, help="git revision of the code measured")
    ap.add_argument("--target-logits-only", action="store_true", help="compute the vocabulary head on target positions only")
    ap.add_argument("--check-cpu", action="store_true", help="functional check: shrunken model on the CPU, nothing written")
    ap.add_argument("--compile", choices=["none", "layers"], default="none",
                    help="torch.compile each decoder and vision-encoder layer")
    ap.add_argument("--profile", help="write a torch.profiler kernel table of two steps of the first size here")
    ap.add_argument("--lora-precision", choices=["fp32", "autocast", "bf16"], default="fp32",
                    help="adapter weights in fp32 (peft default), fp32 under bf16 autocast, or bf16")
    a = ap.parse_args()
    if a.check_cpu:
        measure(a.sizes[0], 2, 1, warmup=1, device="cpu", tiny=True, target_logits_only=a.target_logits_only,
                compile=a.compile, lora_precision=a.lora_precision)
        return 0
    if not torch.cuda.is_available():
        print("bench_vlm_gpu: needs a CUDA device")
        return 2
    import peft
    import transformers

    results = [measure(s, b, a.steps, target_logits_only=a.target_logits_only, compile=a.compile,
                       profile=a.profile if k == 0 else None, lora_precision=a.lora_precision) for k, (s, b) in enumerate(zip(a.sizes, a.batch))]
    rec = {
        "name": "vlm_gpu_throughput",
        "kind": "benchmark",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_vlm_gpu.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0),
        "machine": {"cuda_device": torch.cuda.get_device_name(0), "platform": platform.platform()},
        "revision": a.revision,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "metrics": {f"mfu_{r['image_size']}_b{r['batch']}": r["mfu"] for r in results}
        | {f"samples_per_s_{r['image_size']}_b{r['batch']}": r["samples_per_s"] for r in results},
        "results": results,
        "peak_flops": PEAK_BF16_FLOPS,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
