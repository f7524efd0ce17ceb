"""An offline Gemma-style tokenizer and the PaliGemma processor for tiny models.

Real checkpoints bring Gemma's 256k-token tokenizer; a randomly initialised tiny
model gets a small byte-fallback BPE vocabulary trained here on the words it
will ever see (structure names and synonyms, task words), wrapped as a
transformers Gemma tokenizer so that `PaliGemmaProcessor` treats it exactly like
the real one (it adds `<image>`, `<loc0000>`..`<loc1023>` and `<seg000>`..`<seg127>`).
"""

from __future__ import annotations

import json
from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma ids 0..4
TASK_WORDS = (
    "detect", "segment", "caption", "which structure is highlighted",
    "view orientation", "posteroanterior", "lateral", " ; ",
)


def registry_corpus(registry=None) -> list[str]:
    """Display names and synonyms of every registry structure plus the task words."""
    if registry is None:
        from ..ct.registry import load_registry

        registry = load_registry()
    words: list[str] = list(TASK_WORDS)
    for s in registry:
        words.append(s.display)
        words.extend(s.synonyms)
    return words


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1024):
    """Train a byte-fallback BPE on `corpus` and wrap it as a Gemma tokenizer.

    corpus: texts (names, prompts); defaults to `registry_corpus()`.
    vocab_size: size before the processor's 1,153 added tokens (5 special + 256
        byte tokens + learned merges; must exceed 261 + the alphabet).
    Returns a `GemmaTokenizer` (transformers >= 5) or `GemmaTokenizerFast` (4.x)
    with `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3 as in Gemma.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    texts = list(corpus if corpus is not None else registry_corpus())
    # NOTE: each text is seen several times and with a leading space, as it
    # appears after a task word or " ; " in prompts and targets.
    train_texts = texts * 4 + [" " + t for t in texts] * 4 + list(TASK_WORDS) * 50
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    alphabet = sorted(set("".join(texts).replace(" ", "▁")) | set("▁abcdefghijklmnopqrstuvwxyz0123456789"))
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    # NOTE: training splits before each "▁" so learned pieces look like Gemma's
    # ("▁heart") and never span two words.
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS) + byte_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(train_texts, trainer)
    spec = json.loads(bpe.to_str())["model"]
    vocab = spec["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    try:
        from transformers import GemmaTokenizer

        tok = GemmaTokenizer(vocab=vocab, merges=merges)
        if tok.convert_tokens_to_ids("<eos>") != 1:  # pragma: no cover - 4.x slow class
            raise TypeError
    except TypeError:  # transformers 4.x: the slow Gemma tokenizer needs sentencepiece
        from tokenizers import decoders
        from transformers import GemmaTokenizerFast

        bpe.pre_tokenizer = None
        bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok = GemmaTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>",
                                 unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    return tok


def build_processor(tokenizer, image_size: int = 128, patch_size: int = 16):
    """`PaliGemmaProcessor` for a square `image_size` input and `patch_size` patches.

    Uses the slow (PIL) SigLIP image processor: resize to `image_size`, rescale to
    [0, 1], normalise with mean = std = 0.5 (i.e. to [-1, 1]).
    The processor adds `<image>`, 1024 loc and 128 seg tokens to `tokenizer`.
    """
    from transformers import PaliGemmaProcessor

    try:  # transformers >= 5 names the PIL backend explicitly
        from transformers import SiglipImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import SiglipImageProcessor as ImageProcessor
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    ip = ImageProcessor(size={"height": image_size, "width": image_size},
                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # NOTE: the processor reads the number of <image> tokens from here.
    ip.image_seq_length = (image_size // patch_size) ** 2
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tokenizer)
