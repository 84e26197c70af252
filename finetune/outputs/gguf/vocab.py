"""The trained tokenizer as llama.cpp reads it: a GGUF tokenizer model, token list and types, and special tokens.

Two kinds of tokenizer reach llama.cpp as trained; any other is refused, whatever the architecture:

- byte-level BPE (GPT-2, Qwen, Llama 3, SmolLM): tokenizer model `gpt2`, merges, and the named pre-tokenizer that
  splits text as the trained one does (`pretokenizers`);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1, TinyLlama, Gemma): tokenizer model `llama`,
  whose merge order llama.cpp takes from each token's score (highest first), so the scores are the merge ranks of
  the tokenizer.json the model was trained with; `<0xNN>` pieces typed BYTE; no pre-tokenizer (llama.cpp ignores it).

Token lists and types follow llama.cpp's converter (`get_vocab_base`, `_create_vocab_sentencepiece`); special token
ids, merges and the chat template come from gguf-py's `SpecialVocab`, the converter's own reader, run on the
tokenizer and config saved to a temporary directory. Whether BOS/EOS are added is what the tokenizer does when it
encodes (transformers 5 drops `add_bos_token` from a tokenizer whose tokenizer.json post-processor adds it).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from finetune.errors import RecipeError
from finetune.outputs.gguf.pretokenizers import pre_tokenizer_name

SPACE = "\u2581"  # SentencePiece's visible space
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Encoded to see which special tokens the tokenizer adds around text.
PROBE = "Hello world"


@dataclass(frozen=True)
class Vocabulary:
    model: str  # tokenizer.ggml.model: gpt2 or llama
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # SentencePiece only
    add_space_prefix: bool | None  # SentencePiece only


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """The tokenizer's GGUF metadata, or a refusal naming what llama.cpp could not reproduce."""
    vocabulary = read_vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    _special_vocab(tokenizer, config, vocabulary).add_to_gguf(writer, quiet=True)


def read_vocabulary(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> Vocabulary:
    backend = _backend(tokenizer)
    model = backend["model"]
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise RecipeError(
            f"export --format gguf: the tokenizer has ids up to {max(vocab.values())} but the model's embeddings "
            f"hold {n_vocab} rows; llama.cpp needs every token to have one."
        )
    if model.get("type") == "BPE" and not model.get("byte_fallback", False) and _byte_level(backend):
        tokens, types = _bpe_tokens(tokenizer, vocab, n_vocab)
        return Vocabulary("gpt2", pre_tokenizer_name(tokenizer, backend), tokens, types, None, None)
    if model.get("type") == "BPE" and model.get("byte_fallback", False):
        return _sentencepiece(tokenizer, backend, vocab, n_vocab)
    kind = model.get("type")
    raise RecipeError(
        f"export --format gguf: a {kind} tokenizer{'' if kind != 'BPE' else ' that is neither byte-level nor byte-fallback'}"
        " is not one llama.cpp tokenizes as trained; GGUF export takes byte-level BPE (GPT-2, Llama 3, Qwen, "
        "SmolLM) or SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma). Use --format hf."
    )


def _backend(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RecipeError(
            f"export --format gguf: {type(tokenizer).__name__} has no tokenizer.json (a fast tokenizer) to read the "
            "vocabulary from; use --format hf."
        )
    document: dict[str, Any] = json.loads(backend.to_str())
    return document


def _byte_level(backend: dict[str, Any]) -> bool:
    """Whether text is mapped to GPT-2's byte alphabet (a ByteLevel pre-tokenizer or decoder)."""

    def has(component: dict[str, Any] | None) -> bool:
        if not component:
            return False
        if component.get("type") == "ByteLevel":
            return True
        parts = component.get("pretokenizers") or component.get("decoders") or []
        return any(has(part) for part in parts)

    return has(backend.get("pre_tokenizer")) or has(backend.get("decoder"))


def looks_special(token: str) -> bool:
    """llama.cpp's converter (`does_token_look_special`): added tokens some models forget to mark special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _bpe_tokens(tokenizer: PreTrainedTokenizerBase, vocab: dict[str, int], n_vocab: int) -> tuple[list[str], list[int]]:
    """llama.cpp's `get_vocab_base`: every id up to the embedding size, added tokens typed CONTROL/USER_DEFINED."""
    reverse = {index: text for text, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(n_vocab):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[index]
        if index in added:
            if not added[index].normalized:
                # llama.cpp matches added tokens pre-normalized (as the converter does: encoded and decoded back)
                token = str(tokenizer.decode(tokenizer.encode(token, add_special_tokens=False)))
            if added[index].special or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace(SPACE, " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _sentencepiece(
    tokenizer: PreTrainedTokenizerBase, backend: dict[str, Any], vocab: dict[str, int], n_vocab: int
) -> Vocabulary:
    model = backend["model"]
    missing = [f"<0x{byte:02X}>" for byte in range(256) if f"<0x{byte:02X}>" not in vocab]
    if missing:
        raise RecipeError(
            f"export --format gguf: the tokenizer falls back to bytes but lacks {len(missing)} byte pieces "
            f"(e.g. {missing[0]}); llama.cpp would have no token for those bytes. Use --format hf."
        )
    add_space_prefix = space_prefix(backend)
    reverse = {index: text for text, index in vocab.items()}
    scores = merge_scores(model, vocab)
    added = tokenizer.added_tokens_decoder
    unk = model.get("unk_token")
    tokens: list[str] = []
    types: list[int] = []
    values: list[float] = []
    for index in range(n_vocab):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            values.append(-1000.0)
            continue
        score = scores.get(token, 0.0)
        if index in added:
            # llama.cpp's converter: added tokens score -1000, CONTROL when special (or looking so)
            score = -1000.0
            if added[index].special or looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                token = token.replace(SPACE, " ")  # user-defined tokens are matched pre-normalized
                kind = gguf.TokenType.USER_DEFINED
        elif token == unk:
            kind = gguf.TokenType.UNKNOWN
        elif BYTE_PIECE.fullmatch(token):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(token)
        types.append(kind)
        values.append(score)
    return Vocabulary("llama", "default", tokens, types, values, add_space_prefix)


def merge_scores(model: dict[str, Any], vocab: dict[str, int]) -> dict[str, float]:
    """Each token's SentencePiece score from the merge order: llama.cpp merges the adjacent pair whose joined token
    scores highest (leftmost on ties), tokenizers the pair whose merge ranks first, so a token scores minus the rank
    of the first merge that makes it. A multi-character token no merge makes scores below every merge (the trained
    tokenizer never produces it); single characters never come out of a merge, so their score is never read."""
    merges = model.get("merges") or []
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    floor = -float(len(merges))
    for token in vocab:
        if token not in scores and len(token) > 1 and not BYTE_PIECE.fullmatch(token):
            scores[token] = floor
    return scores


def space_prefix(backend: dict[str, Any]) -> bool:
    """Whether the tokenizer puts SentencePiece's space before the text (llama.cpp's `add_space_prefix`), from the
    two layouts transformers writes: a Metaspace pre-tokenizer, or normalizers that prepend and replace spaces."""
    normalizer, pre = backend.get("normalizer"), backend.get("pre_tokenizer")
    if pre and pre.get("type") == "Metaspace" and normalizer is None and pre.get("replacement") == SPACE:
        return pre.get("prepend_scheme", "always") in ("first", "always")
    steps = (normalizer.get("normalizers") or []) if normalizer and normalizer.get("type") == "Sequence" else []
    if normalizer and normalizer.get("type") != "Sequence":
        steps = [normalizer]
    replaces = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    # Gemma splits on " " after the normalizer replaced every space: a no-op.
    inert = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    if inert and steps == [replaces]:
        return False
    if inert and steps == [{"type": "Prepend", "prepend": SPACE}, replaces]:
        return True
    raise RecipeError(
        "export --format gguf: this byte-fallback tokenizer handles spaces in a way llama.cpp's SentencePiece "
        f"tokenizer does not (normalizer {normalizer}, pre-tokenizer {pre}); use --format hf."
    )


def added_specials(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """The token the tokenizer puts before text and the one after (None: nothing), as llama.cpp can add them."""
    plain = tokenizer.encode(PROBE, add_special_tokens=False)
    full = tokenizer.encode(PROBE)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            before, after = full[:start], full[start + len(plain) :]
            if len(before) <= 1 and len(after) <= 1:
                return (before[0] if before else None), (after[0] if after else None)
    raise RecipeError(
        f"export --format gguf: the tokenizer adds {full} around {plain}; llama.cpp adds at most one BOS token "
        "before the text and one EOS token after it. Use --format hf."
    )


def _special_vocab(
    tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, vocabulary: Vocabulary
) -> gguf.SpecialVocab:
    # SpecialVocab warns about post-processor templates it cannot parse; what it parses from them (add BOS/EOS)
    # is replaced below by what the tokenizer does, so the warnings would only mislead.
    chatter = logging.getLogger("gguf.vocab")
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-gguf-") as directory:
            tokenizer.save_pretrained(directory)
            config.to_json_file(str(Path(directory) / "config.json"))
            special = gguf.SpecialVocab(
                directory, load_merges=vocabulary.model == "gpt2", n_vocab=len(vocabulary.tokens)
            )
    finally:
        chatter.setLevel(level)
    before, after = added_specials(tokenizer)
    # What the tokenizer does decides, not a flag: the ids llama.cpp adds are the ones it adds.
    special.add_special_token = {"bos": before is not None, "eos": after is not None}
    if before is not None:
        special.special_token_ids["bos"] = before
    if after is not None:
        special.special_token_ids["eos"] = after
    return special
