"""PaliGemma location tokens, prompts, targets and the output parser.

Conventions (big_vision's PaliGemma segmentation format):

* A box is ``(ymin, xmin, ymax, xmax)`` normalised to [0, 1]. Each coordinate is
  binned as ``round(v * 1023)`` clipped to ``0..1023`` and written ``<loc%04d>``
  in that y, x, y, x order. A bin decodes to ``bin / 1023``.
* A mask is 16 ``<seg%03d>`` tokens (indices into a 128-entry VQ-VAE codebook),
  written right after the 4 location tokens: ``<loc×4><seg×16> name``.
* Several instances are joined with ``" ; "``.

The geometry of boxes (binning, pixel boxes) is :mod:`~chexanatomy_lib.codec.geometry`'s;
this module writes and reads the text. No model is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .geometry import NUM_LOC_BINS, bins_to_boxes, box_to_bins, box_to_pixel_box

NUM_SEG_CODES = 128  # <seg000> .. <seg127>: entries of the mask VQ-VAE's codebook
NUM_SEG_TOKENS = 16  # seg tokens per mask (a 4x4 grid of codes)
TASKS = ("segment", "detect")

_LOC_RE = re.compile(r"<loc(\d+)>")
_SEG_RE = re.compile(r"<seg(\d+)>")
# Any angle-bracket token (loc, seg, or something else such as <eos>).
_TOKEN_RE = re.compile(r"<[^<>\s]*>")
_SPECIAL_END = ("<eos>", "</s>", "<pad>")


# --------------------------------------------------------------------------- boxes
def box_to_loc_tokens(box: Sequence[float] | np.ndarray) -> str:
    """Normalised box ``(ymin, xmin, ymax, xmax)`` in [0, 1] -> ``"<loc0123><loc0045><loc0987><loc0800>"``.

    Values outside [0, 1] are clipped to the first/last bin (as big_vision does).
    Raises ``ValueError`` unless the box is 4 finite numbers.
    """
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape != (4,):
        raise ValueError(f"box must have shape [4] (ymin, xmin, ymax, xmax); got {arr.shape}")
    return "".join(f"<loc{b:04d}>" for b in box_to_bins(arr))


def loc_tokens_to_box(text: str) -> np.ndarray:
    """``"<loc..><loc..><loc..><loc..>"`` -> float64 [4] normalised box (``bin / 1023``).

    Strict: raises ``ValueError`` unless the text is exactly four location tokens
    in range(1024). Use :func:`parse_output` for model output that may be malformed.
    """
    stripped = text.strip()
    bins = [int(b) for b in _LOC_RE.findall(stripped)]
    if len(bins) != 4 or _LOC_RE.sub("", stripped) != "":
        raise ValueError(f"expected exactly 4 <locNNNN> tokens, got {text!r}")
    if any(b >= NUM_LOC_BINS for b in bins):
        raise ValueError(f"location bin out of range(1024) in {text!r}")
    return bins_to_boxes(np.asarray(bins, dtype=np.int64))


def pixel_box_to_tokens(pixel_box: Sequence[int], height: int, width: int) -> str:
    """Pixel-edge box ``(y0, x0, y1, x1)`` (ints, ``y1``/``x1`` exclusive) -> 4 location tokens."""
    y0, x0, y1, x1 = (float(v) for v in pixel_box)
    return box_to_loc_tokens([y0 / height, x0 / width, y1 / height, x1 / width])


def tokens_to_pixel_box(text: str, height: int, width: int) -> tuple[int, int, int, int]:
    """4 location tokens -> pixel box ``(y0, x0, y1, x1)`` (``int(bin / 1023 * size)``)."""
    return box_to_pixel_box(loc_tokens_to_box(text), height, width)


def seg_tokens(codes: Sequence[int] | np.ndarray) -> str:
    """Codes int [16] in range(128) -> ``"<seg012>...<seg127>"``."""
    arr = np.asarray(codes)
    if arr.shape != (NUM_SEG_TOKENS,):
        raise ValueError(f"codes must have shape [16]; got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= NUM_SEG_CODES:
        raise ValueError(f"codes must be integers in range(128); got {arr.tolist()}")
    return "".join(f"<seg{int(c):03d}>" for c in arr)


# --------------------------------------------------------------------------- prompts
def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")


def _check_name(name: str) -> str:
    clean = " ".join(str(name).split())
    if not clean or ";" in clean or "<" in clean or ">" in clean:
        raise ValueError(f"structure name {name!r} must be non-empty and contain no ';', '<' or '>'")
    return clean


def format_prompt(task: str, names: Iterable[str]) -> str:
    """``format_prompt("segment", ["left lung", "heart"]) -> "segment left lung ; heart"``."""
    _check_task(task)
    names = [_check_name(n) for n in names]
    if not names:
        raise ValueError("format_prompt needs at least one structure name")
    return f"{task} " + " ; ".join(names)


def format_target(task: str, instances: Iterable[tuple]) -> str:
    """Training target text.

    ``instances``: ``(name, box, codes)`` tuples; ``box`` normalised float [4],
    ``codes`` int [16] in range(128) (ignored, may be ``None``, for ``"detect"``).
    Returns ``"<loc×4><seg×16> left lung ; <loc×4><seg×16> heart"`` (``"detect"``: no seg tokens).
    """
    _check_task(task)
    parts = []
    for inst in instances:
        if len(inst) == 2:
            name, box = inst
            codes = None
        else:
            name, box, codes = inst
        tokens = box_to_loc_tokens(box)
        if task == "segment":
            if codes is None:
                raise ValueError(f"format_target('segment'): instance {name!r} has no codes")
            tokens += seg_tokens(codes)
        parts.append(f"{tokens} {_check_name(name)}")
    if not parts:
        raise ValueError("format_target needs at least one instance")
    return " ; ".join(parts)


# --------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class ParsedInstance:
    """One instance read back from model output.

    name: the text after the tokens (whitespace-normalised; ``""`` when absent).
    box: float64 [4] normalised in [0, 1] when 4 in-range location tokens were read, else None.
    codes: int64 [16] in range(128) when 16 in-range seg tokens were read, else None.
    valid: True only when everything the task needs is present and well formed.
    reason: why it is invalid (None when valid).
    """

    name: str
    box: np.ndarray | None
    codes: np.ndarray | None
    valid: bool
    reason: str | None = None


def _normalise_name(name: str) -> str:
    return " ".join(name.split()).lower()


def _parse_instance(chunk: str, task: str, known: set[str] | None) -> ParsedInstance:
    text = chunk.strip()
    # Leading run of tokens (possibly separated by whitespace), then the name.
    pos = 0
    tokens: list[str] = []
    while True:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            # allow whitespace between tokens
            ws = re.match(r"\s+", text[pos:])
            if ws and _TOKEN_RE.match(text, pos + ws.end()):
                pos += ws.end()
                continue
            break
        tokens.append(m.group(0))
        pos = m.end()
    rest = text[pos:]
    name_raw = rest.strip()
    name = " ".join(name_raw.split())

    loc = [int(_LOC_RE.fullmatch(t).group(1)) for t in tokens if _LOC_RE.fullmatch(t)]
    seg = [int(_SEG_RE.fullmatch(t).group(1)) for t in tokens if _SEG_RE.fullmatch(t)]
    other = [t for t in tokens if not (_LOC_RE.fullmatch(t) or _SEG_RE.fullmatch(t))]

    box = None
    codes = None
    loc_ok = len(loc) >= 4 and all(b < NUM_LOC_BINS for b in loc[:4])
    if loc_ok:
        box = bins_to_boxes(np.asarray(loc[:4], dtype=np.int64))
    seg_ok = len(seg) >= NUM_SEG_TOKENS and all(c < NUM_SEG_CODES for c in seg[:NUM_SEG_TOKENS])
    if seg_ok:
        codes = np.asarray(seg[:NUM_SEG_TOKENS], dtype=np.int64)

    def bad(reason: str) -> ParsedInstance:
        return ParsedInstance(name, box, codes, False, reason)

    # Expected layout: 4 loc first, then (segment) 16 seg, nothing else.
    n_seg_needed = NUM_SEG_TOKENS if task == "segment" else 0
    if len(loc) < 4 or len(seg) < n_seg_needed:
        return bad(f"missing tokens: got {len(loc)} loc and {len(seg)} seg, need 4 and {n_seg_needed}")
    if not loc_ok:
        return bad("out of range: location bin > 1023")
    if task == "segment" and not seg_ok:
        return bad("out of range: seg code > 127")
    layout = ["loc"] * 4 + ["seg"] * n_seg_needed
    kinds = ["loc" if _LOC_RE.fullmatch(t) else "seg" if _SEG_RE.fullmatch(t) else "other" for t in tokens]
    if kinds != layout or other:
        return bad("trailing junk: unexpected or misplaced tokens " + "".join(tokens[:24]))
    if "<" in rest or ">" in rest:
        return bad("trailing junk: tokens after the name")
    if box[2] <= box[0]:
        return bad("ymax<=ymin")
    if box[3] <= box[1]:
        return bad("xmax<=xmin")
    if not name:
        return bad("missing name")
    if known is not None and _normalise_name(name) not in known:
        return bad(f"unknown name {name!r}")
    if task == "detect":
        codes = None
    return ParsedInstance(name, box, codes, True, None)


def parse_output(
    text: str,
    task: str = "segment",
    expected: Sequence[str] | None = None,
    known_names: set[str] | Iterable[str] | None = None,
) -> list[ParsedInstance]:
    """Parse generated text into instances. Never raises.

    text: decoded model output, e.g. ``"<loc..×4><seg..×16> left lung ; <loc..×4><seg..×16> heart"``;
        a trailing ``<eos>``/``<pad>`` is ignored.
    task: ``"segment"`` (4 loc + 16 seg tokens per instance) or ``"detect"`` (4 loc tokens).
    expected: if given, the result has exactly one entry per expected name, in that order:
        the first not-yet-used parsed instance with that name (case- and space-insensitive),
        or an invalid entry with reason ``"not in output"``.
    known_names: if given, an instance whose name is not among them is invalid (``"unknown name"``).

    Invalid reasons: ``missing tokens``, ``out of range``, ``ymax<=ymin``, ``xmax<=xmin``,
    ``unknown name``, ``trailing junk``, ``missing name``, ``not in output``, ``bad input``.
    Boxes returned are always in [0, 1]; codes always in range(128).
    """
    try:
        if task not in TASKS:
            return [ParsedInstance("", None, None, False, f"bad input: unknown task {task!r}")]
        if not isinstance(text, str):
            return [ParsedInstance("", None, None, False, "bad input: text is not a string")]
        body = text.strip()
        changed = True
        while changed:
            changed = False
            for tok in _SPECIAL_END:
                if body.endswith(tok):
                    body = body[: -len(tok)].rstrip()
                    changed = True
        known = None if known_names is None else {_normalise_name(n) for n in known_names}
        chunks = [c for c in body.split(";")] if body else []
        parsed = [_parse_instance(c, task, known) for c in chunks if c.strip()]
        if expected is None:
            return parsed
        used = [False] * len(parsed)
        out = []
        for want in expected:
            key = _normalise_name(str(want))
            hit = None
            for i, p in enumerate(parsed):
                if not used[i] and _normalise_name(p.name) == key:
                    hit = i
                    break
            if hit is None:
                out.append(ParsedInstance(str(want), None, None, False, "not in output"))
            else:
                used[hit] = True
                out.append(parsed[hit])
        return out
    except Exception as exc:  # noqa: BLE001  NOTE: the contract is "never raises"
        return [ParsedInstance("", None, None, False, f"bad input: {type(exc).__name__}")]

