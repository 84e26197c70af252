"""The tokenizer in the GGUF file as llama.cpp reads it: SentencePiece scores, BYTE pieces, BOS from the
post-processor; byte-level merges and control tokens; the same refusals for every architecture."""

from __future__ import annotations

import heapq
import json

import pytest
from conftest import corpus
from test_gguf_architectures import (
    HELD_OUT,
    byte_level_tokenizer,
    export,
    fields,
    sentencepiece_tokenizer,
    tiny_decoder,
)

from finetune.errors import RecipeError

SPACE = "\u2581"
# Held-out text for the SentencePiece tokenizer (none starts with a space: see docs/export.md on prefix spaces)
SPM_TEXTS = [*HELD_OUT, "the recipe's oven at 220°C", "score: 3-1, wind 40km/h", "Ünïcödé naïveté ÆØÅ", "a" * 9]


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float], add_space_prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm_session` in src/llama-vocab.cpp), ported: spaces
    escaped, characters as symbols, the adjacent pair whose joined token scores highest merged first (leftmost on
    ties), characters no token covers written as their `<0xNN>` bytes."""
    lookup = {token: index for index, token in enumerate(tokens)}
    text = (" " + text if add_space_prefix else text).replace(" ", SPACE)
    symbols = list(text)
    prev = list(range(-1, len(symbols) - 1))
    nxt = [*range(1, len(symbols)), -1]
    queue: list[tuple[float, int, int, int]] = []

    def bigram(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        joined = symbols[left] + symbols[right]
        if joined in lookup:
            heapq.heappush(queue, (-scores[lookup[joined]], left, right, len(joined)))

    for i in range(1, len(symbols)):
        bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
            continue
        symbols[left], symbols[right] = symbols[left] + symbols[right], ""
        nxt[left] = nxt[right]
        if nxt[right] != -1:
            prev[nxt[right]] = left
        bigram(prev[left], left)
        bigram(left, nxt[left])
    ids: list[int] = []
    for symbol in symbols:
        if not symbol:
            continue
        if symbol in lookup:
            ids.append(lookup[symbol])
        else:
            ids += [lookup[f"<0x{byte:02X}>"] for byte in symbol.encode("utf-8")]
    return ids


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("spm")
    sentencepiece_tokenizer().save_pretrained(directory)
    # as a run loads it: transformers 5 reads tokenizer.json and forgets add_bos_token
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert not tokenizer.add_bos_token and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    model = tiny_decoder("llama", tokenizer)
    return tokenizer, fields(export(model, tokenizer, directory))[0]


def test_sentencepiece_is_written_as_llama_cpp_reads_it(spm_file):
    import gguf

    tokenizer, metadata = spm_file
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    assert metadata["tokenizer.ggml.model"] == "llama" and metadata["tokenizer.ggml.pre"] == "default"
    vocab = tokenizer.get_vocab()
    assert tokens[: len(vocab)] == [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    assert [i for i, kind in enumerate(types) if kind == gguf.TokenType.BYTE] == [
        vocab[f"<0x{byte:02X}>"] for byte in range(256)
    ]
    # added special tokens are CONTROL, <unk> included, as llama.cpp's converter types them from added_tokens_decoder
    assert types[vocab["<unk>"]] == types[vocab["<s>"]] == types[vocab["</s>"]] == gguf.TokenType.CONTROL
    assert metadata["tokenizer.ggml.add_bos_token"] is True  # the post-processor adds <s>
    assert metadata["tokenizer.ggml.add_eos_token"] is False
    assert metadata["tokenizer.ggml.bos_token_id"] == vocab["<s>"]
    assert metadata["tokenizer.ggml.add_space_prefix"] is True
    assert "tokenizer.ggml.merges" not in metadata  # llama.cpp's SentencePiece merges by score alone
    # a token made by a merge scores minus the rank of the first merge that makes it
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    assert {token: -metadata["tokenizer.ggml.scores"][vocab[token]] for token in first} == first


def test_llama_cpps_sentencepiece_merges_by_the_scores_as_the_tokenizer_was_trained(spm_file):
    tokenizer, metadata = spm_file
    tokens, scores = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"]
    for text in SPM_TEXTS:
        ours = [tokenizer.bos_token_id, *llama_cpp_spm(text, tokens, scores, add_space_prefix=True)]
        assert ours == tokenizer(text)["input_ids"], text
    # the check can fail: scores that do not follow the merge order merge other pairs first
    inverted = [-score for score in scores]
    texts = [row["text"] for row in corpus(40, seed=5)]
    wrong = [t for t in texts if llama_cpp_spm(t, tokens, inverted, True) != tokenizer(t)["input_ids"][1:]]
    assert len(wrong) >= len(texts) // 10


def test_gemma_style_sentencepiece_adds_no_space(tmp_path):
    tokenizer = sentencepiece_tokenizer("GemmaTokenizer")
    metadata, _ = fields(export(tiny_decoder("gemma2", tokenizer), tokenizer, tmp_path))
    assert metadata["tokenizer.ggml.add_space_prefix"] is False
    tokens, scores = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"]
    for text in SPM_TEXTS:
        assert [tokenizer.bos_token_id, *llama_cpp_spm(text, tokens, scores, False)] == tokenizer(text)["input_ids"]


def test_byte_level_bpe_keeps_merges_and_control_tokens(tmp_path):
    import gguf

    tokenizer = byte_level_tokenizer()
    metadata, _ = fields(export(tiny_decoder("qwen2", tokenizer), tokenizer, tmp_path))
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "gpt-2"
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert metadata["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    vocab = tokenizer.get_vocab()
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert metadata["tokenizer.ggml.token_type"][vocab[special]] == gguf.TokenType.CONTROL
    assert metadata["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds nothing around text
    assert "tokenizer.ggml.scores" not in metadata


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(HELD_OUT * 3, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[UNK]")


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_other_tokenizers_are_refused_for_every_architecture_alike(model_type, tmp_path):
    tokenizer = wordpiece_tokenizer()
    with pytest.raises(RecipeError, match="a WordPiece tokenizer is not one llama.cpp tokenizes as trained"):
        export(tiny_decoder(model_type, tokenizer), tokenizer, tmp_path)
    assert not (tmp_path / "model.gguf").exists() or (tmp_path / "model.gguf").stat().st_size == 0
