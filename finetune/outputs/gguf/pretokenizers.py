"""Which of llama.cpp's named pre-tokenizers (`tokenizer.ggml.pre`) splits a byte-level BPE vocabulary's text as
the trained tokenizer does.

A vocabulary llama.cpp knows is identified as llama.cpp's own converter identifies it: the hash of the tokenizer's
ids on llama.cpp's reference text, looked up in llama.cpp's table (`llama_cpp_hashes`). A vocabulary it does not know
(a tokenizer trained for the user's data, a new release) is identified from its own definition in `tokenizer.json`:
the regexes its pre-tokenizer isolates, in order, and whether its BPE ignores merges for whole-word tokens, mapped to
the named pre-tokenizer whose regexes in llama.cpp's `llama-vocab.cpp` split the same way. Neither: refused, never
written as `default` (llama.cpp then splits contractions, digits and punctuation differently, silently).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from finetune.errors import RecipeError
from finetune.outputs.gguf.llama_cpp_hashes import CHECK_TEXT, KNOWN_VOCABULARIES

# Split patterns as tokenizer.json files spell them.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGITS = r"\p{N}"  # tokenizers' Digits(individual_digits=True)
DIGIT_RUNS = r"\p{N}+"  # Digits(individual_digits=False)

# (regexes isolated in order, BPE ignore_merges) -> the llama.cpp name whose llama-vocab.cpp regexes split the same
# way and whose ignore_merges matches (llama.cpp turns it on for its llama3 names). tests/outputs/
# test_gguf_pretokenizers.py splits text with both, llama.cpp's regexes copied from llama-vocab.cpp. GPT-4o's and
# Tekken's patterns are not here: llama.cpp approximates their \p{M} classes, and text with combining marks (Khmer
# in llama.cpp's own reference text) splits differently, so such a new vocabulary is refused, not guessed.
BY_DEFINITION: dict[tuple[tuple[str, ...], bool], str] = {
    ((GPT2_SPLIT,), False): "gpt-2",
    ((DIGITS, GPT2_SPLIT), False): "smollm",
    ((LLAMA3_SPLIT,), True): "llama-bpe",
    ((LLAMA3_SPLIT,), False): "smaug-bpe",
    ((QWEN2_SPLIT,), False): "qwen2",
}


def vocabulary_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's `chkhsh`: sha256 of the ids' Python repr on its reference text, special tokens included."""
    ids = tokenizer.encode(CHECK_TEXT)
    return hashlib.sha256(str(ids).encode()).hexdigest()


def known_pre_tokenizer(chkhsh: str) -> str | None:
    """The name llama.cpp's converter writes for this hash (the later entry wins, as there)."""
    found = None
    for known, name in KNOWN_VOCABULARIES:
        if known == chkhsh:
            found = name
    return found


def split_regexes(pre_tokenizer: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The regexes a byte-level pre-tokenizer isolates, in order; None when it is not one this module can read
    (a step other than isolating splits and digits, a prefix space, no ByteLevel at the end)."""
    if not pre_tokenizer:
        return None
    steps: Sequence[dict[str, Any]] = (
        pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    )
    regexes: list[str] = []
    for position, step in enumerate(steps):
        kind = step.get("type")
        last = position == len(steps) - 1
        if kind == "ByteLevel" and last and not step.get("add_prefix_space", False):
            if step.get("use_regex", True):
                regexes.append(GPT2_SPLIT)
            return tuple(regexes)
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert", False):
            pattern = step.get("pattern", {})
            if "Regex" not in pattern:
                return None
            regexes.append(pattern["Regex"])
        elif kind == "Digits":
            regexes.append(DIGITS if step.get("individual_digits", False) else DIGIT_RUNS)
        else:
            return None
    return None


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase, backend: dict[str, Any]) -> str:
    """`tokenizer.ggml.pre` for a byte-level BPE tokenizer (`backend`: its tokenizer.json), or a refusal."""
    chkhsh = vocabulary_hash(tokenizer)
    if name := known_pre_tokenizer(chkhsh):
        return name
    regexes = split_regexes(backend.get("pre_tokenizer"))
    ignore_merges = bool(backend["model"].get("ignore_merges", False))
    if regexes is not None and (name := BY_DEFINITION.get((regexes, ignore_merges))):
        return name
    described = "an unreadable pre-tokenizer" if regexes is None else f"split regexes {list(regexes)}"
    raise RecipeError(
        "export --format gguf: llama.cpp has no pre-tokenizer known to split this tokenizer's text as it was "
        f"trained: its vocabulary is not in llama.cpp's table (hash {chkhsh}) and its definition ({described}, "
        f"ignore_merges={ignore_merges}) matches none of {sorted(set(BY_DEFINITION.values()))}. Writing "
        "'default' would tokenize differently; use --format hf, or a tokenizer with one of those pre-tokenizers."
    )
