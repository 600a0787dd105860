"""A real ``transformers.CLIPTokenizer`` built offline from the BPE vocabulary that ships inside
open_clip (``bpe_simple_vocab_16e6.txt.gz``, the vocabulary of OpenAI CLIP and Stable Diffusion).

The vocabulary order follows open_clip's ``SimpleTokenizer`` (= OpenAI's ``vocab.json``): 256 byte
characters, the same with ``</w>``, one entry per merge, then ``<|startoftext|>``, ``<|endoftext|>``
(49408 entries), so token ids match the real Stable Diffusion tokenizer."""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # as in open_clip / OpenAI CLIP: vocabulary size 49408


def bpe_vocab_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP reversible byte -> printable unicode map
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges(path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` exactly as in OpenAI CLIP's ``vocab.json`` / ``merges.txt``."""
    lines = gzip.open(path or bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """The Stable Diffusion 1.x tokenizer (pad token ``<|endoftext|>``), built without network."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
