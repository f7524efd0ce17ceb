"""Decoding: grammar-constrained and free greedy generation of ``segment`` outputs.

For a request ``"segment a ; b ; c"`` the output grammar is, per structure in
order: four loc tokens forming a valid box (``ymax > ymin``, ``xmax > xmin``),
sixteen seg tokens, the requested name's tokens, then ``" ; "`` (or ``<eos>``
after the last). Only the loc and seg tokens are free choices, so the grammar is
a fixed sequence of slots that a `LogitsProcessor` enforces by masking logits.
All structures of one image are asked in one sequence, so the image prefix is
encoded once per image.

Within the grammar a box coordinate is read from the model's distribution over
the allowed `<loc>` bins by one of `LOC_RULES`: ``"greedy"`` takes its mode,
``"median"`` its median bin. The bins are ordered (a coordinate is a position on a
line), so the median is the choice with the least expected absolute error in bins;
a model that is unsure spreads its mass over neighbouring bins, and the mode of a
broad distribution jumps with small changes of the logits while its median does not.
Segmentation tokens are categorical (codebook entries have no order) and stay greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..codec.geometry import NUM_LOC_BINS
from ..codec.tokens import NUM_SEG_CODES, NUM_SEG_TOKENS

# Slot kinds of the grammar plan (non-negative entries are forced token ids).
Y0, X0, Y1, X1, SEG = -1, -2, -3, -4, -5
_LOC_ORDER = (Y0, X0, Y1, X1)
#: How a box coordinate is read from the distribution over allowed `<loc>` bins.
LOC_RULES = ("greedy", "median")


def grammar_plan(tokenizer, names: Sequence[str]) -> list[int]:
    """Slot sequence of the constrained output for `names` (ending with `<eos>`).

    Built by tokenising a template target (with placeholder tokens), so forced
    name and separator ids are exactly the ids training used.
    Entries: `Y0, X0, Y1, X1` (loc slots), `SEG`, or a forced token id (>= 0).
    """
    from ..codec.tokens import format_target

    template = format_target("segment", [(n, np.array([0.0, 0.0, 1.0, 1.0]), np.zeros(NUM_SEG_TOKENS, np.int64))
                                         for n in names])
    ids = tokenizer(template, add_special_tokens=False)["input_ids"]
    loc0 = tokenizer.convert_tokens_to_ids("<loc0000>")
    seg0 = tokenizer.convert_tokens_to_ids("<seg000>")
    plan: list[int] = []
    k = 0
    for t in ids:
        if loc0 <= t < loc0 + NUM_LOC_BINS:
            plan.append(_LOC_ORDER[k % 4])
            k += 1
        elif seg0 <= t < seg0 + NUM_SEG_CODES:
            plan.append(SEG)
        else:
            plan.append(int(t))
    plan.append(int(tokenizer.eos_token_id))
    return plan


def _logits_processor_base():
    from transformers import LogitsProcessor

    return LogitsProcessor


class SegmentGrammar(_logits_processor_base()):
    """`LogitsProcessor` enforcing a `grammar_plan` on every row of a batch.

    prompt_len: length of the (left-padded) prompt ids given to `generate`.
    loc_start / seg_start: ids of `<loc0000>` and `<seg000>`.
    pad_id: forced once the plan is complete (rows stay aligned).
    loc_rule: one of `LOC_RULES`; ``"median"`` leaves one allowed token at a loc slot,
    the median bin of the softmax over the allowed bins; ``"greedy"`` (the default
    here: the grammar alone) only masks, and generation takes the most likely token.
    """

    def __init__(self, plan: Sequence[int], prompt_len: int, loc_start: int, seg_start: int, pad_id: int,
                 loc_rule: str = "greedy"):
        if loc_rule not in LOC_RULES:
            raise ValueError(f"loc_rule must be one of {LOC_RULES}, got {loc_rule!r}")
        self.loc_rule = loc_rule
        self.plan = list(plan)
        self.prompt_len = int(prompt_len)
        self.loc_start = int(loc_start)
        self.seg_start = int(seg_start)
        self.pad_id = int(pad_id)

    def __call__(self, input_ids, scores):
        import torch

        t = input_ids.shape[1] - self.prompt_len
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        slot = self.plan[t] if t < len(self.plan) else self.pad_id
        L = self.loc_start
        if slot >= 0:
            allowed[:, slot] = True
        elif slot == SEG:
            allowed[:, self.seg_start:self.seg_start + NUM_SEG_CODES] = True
        elif slot in (Y0, X0):
            allowed[:, L:L + NUM_LOC_BINS - 1] = True  # leave room for a larger max
        else:  # Y1 / X1: strictly greater than the matching min two tokens back
            lo = input_ids[:, -2] - L + 1  # [B]
            bins = torch.arange(NUM_LOC_BINS, device=scores.device)
            ok = bins[None, :] >= lo[:, None].clamp(1, NUM_LOC_BINS - 1)
            allowed[:, L:L + NUM_LOC_BINS] = ok
        scores = scores.masked_fill(~allowed, float("-inf"))
        if self.loc_rule == "median" and slot in _LOC_ORDER:
            scores = _force_median_bin(scores, L)
        return scores


def _force_median_bin(scores, loc_start: int):
    """Scores float [B, V] (disallowed = -inf) -> only the median `<loc>` bin of each row left finite.

    The median is the first bin where the cumulative softmax over the 1,024 loc
    scores reaches one half; it is an allowed bin because disallowed ones carry no mass.
    """
    import torch

    loc = scores[:, loc_start:loc_start + NUM_LOC_BINS].float()
    cdf = torch.softmax(loc, dim=-1).cumsum(dim=-1)
    # NOTE: the clamp is only a guard: the cumulative softmax ends at 1 up to rounding.
    median = (cdf < 0.5).sum(dim=-1).clamp(max=NUM_LOC_BINS - 1)
    rows = torch.arange(scores.shape[0], device=scores.device)
    out = torch.full_like(scores, float("-inf"))
    out[rows, loc_start + median] = scores[rows, loc_start + median]
    return out


@dataclass
class Decoded:
    """Output for one image: raw text, per-structure parse, masks, boxes.

    text: generated text (special tokens kept, `<eos>`/`<pad>` stripped).
    names: requested names (prompt order).
    parsed: `ParsedInstance` per requested name (`codec.tokens.parse_output`).
    """

    text: str
    names: list[str]
    parsed: list[Any]


def generate_segment(
    vlm,
    images: Sequence[np.ndarray],
    names: Sequence[str],
    constrained: bool = True,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = False,
    loc_rule: str = "median",
) -> list[Decoded]:
    """Greedy decoding of ``"segment " + " ; ".join(names)`` for each image.

    images: float [H, W] grey in [0, 1] (or [H, W, 3]); any size (the processor resizes).
    names: names to request (prompt text, e.g. display names), the same for every image.
    constrained: enforce the grammar (`SegmentGrammar`); False = free greedy decoding.
    loc_rule: how a constrained box coordinate is read (`LOC_RULES`); free decoding is greedy throughout.
    Returns one `Decoded` per image; malformed free output never raises (it is
    reported as invalid instances by the parser).
    """
    import torch
    from tqdm.auto import tqdm

    from ..codec.tokens import format_prompt, parse_output
    from .tasks import Sample, encode_batch, grey_to_rgb

    if loc_rule not in LOC_RULES:
        raise ValueError(f"loc_rule must be one of {LOC_RULES}, got {loc_rule!r}")
    tok = vlm.processor.tokenizer
    model = vlm.model
    dev = torch.device(device) if device else next(model.parameters()).device
    plan = grammar_plan(tok, names)
    prompt = format_prompt("segment", names)
    loc0 = tok.convert_tokens_to_ids("<loc0000>")
    seg0 = tok.convert_tokens_to_ids("<seg000>")
    results: list[Decoded] = []
    model.eval()
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="decoding", disable=not progress):
        chunk = images[s:s + batch_size]
        samples = [Sample(grey_to_rgb(im) if np.asarray(im).ndim == 2 else np.asarray(im, np.float32),
                          prompt, None, "segment") for im in chunk]
        batch = {k: v.to(dev) for k, v in encode_batch(vlm.processor, samples, train=False).items()}
        prompt_len = batch["input_ids"].shape[1]
        kw: dict[str, Any] = dict(max_new_tokens=len(plan), do_sample=False, num_beams=1,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if constrained:
            from transformers import LogitsProcessorList

            kw["logits_processor"] = LogitsProcessorList(
                [SegmentGrammar(plan, prompt_len, loc0, seg0, tok.pad_token_id, loc_rule=loc_rule)])
        else:
            kw["max_new_tokens"] = len(plan) + 8
        with torch.no_grad():
            out = model.generate(**batch, **kw)
        gen = out[:, prompt_len:].cpu().tolist()
        for row in gen:
            text = tok.decode(row, skip_special_tokens=False)
            for end in ("<eos>", "<pad>"):
                cut = text.find(end)
                if cut >= 0:
                    text = text[:cut]
            parsed = parse_output(text, "segment", expected=list(names))
            results.append(Decoded(text.strip(), list(names), parsed))
    return results


def instances_to_arrays(decoded: Sequence[Decoded], codec, height: int, width: int):
    """Decoded outputs -> (masks bool [N, S, H, W], boxes float32 [N, S, 4] (NaN if invalid), valid bool [N, S]).

    Masks come from the codec's decoder at `height` x `width`; invalid instances
    get empty masks and NaN boxes.
    """
    n = len(decoded)
    s = len(decoded[0].names) if n else 0
    masks = np.zeros((n, s, height, width), bool)
    boxes = np.full((n, s, 4), np.nan, np.float32)
    valid = np.zeros((n, s), bool)
    rows, b_list, c_list = [], [], []
    for i, d in enumerate(decoded):
        for j, p in enumerate(d.parsed):
            if p.valid and p.box is not None and p.codes is not None:
                valid[i, j] = True
                boxes[i, j] = p.box
                rows.append((i, j))
                b_list.append(p.box)
                c_list.append(p.codes)
    if rows:
        dec = codec.decode(np.stack(b_list), np.stack(c_list), height, width)
        for (i, j), m in zip(rows, dec):
            masks[i, j] = m
    return masks, boxes, valid
