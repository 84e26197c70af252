"""GGUF export for every supported decoder architecture, with a byte-level BPE and a SentencePiece tokenizer.

Tiny checkpoints built from config (weights random, norms moved off their init so that offsets show) are written
with `write_gguf` and read back three ways: gguf-py's GGUFReader (architecture, tensor names llama.cpp's arch knows,
metadata), transformers' GGUF loader where it loads the architecture (logits and token ids against the model), and
llama.cpp itself through llama-cpp-python when it is installed (every architecture: token ids, logits).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import corpus

from finetune.errors import RecipeError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HELD_OUT = [  # not in the tokenizers' training text
    "rain sun cloud storm",
    "I'll say it's 42 degrees (roughly) -- isn't it?",
    "We've got 3,141 apples; they're [fresh].",
    "naïve café 🦙 x=1+2",
    "two  spaces\n\nnewlines\tand tabs ",
    "Don't-stop 2024: 'RE you sure? <|im_end|>",
]
TRAINING_EXTRA = [
    "I'll say it's 42 degrees (roughly) -- isn't it?",
    "We've got 3,141 apples & 27 pears; they're [fresh].",
    "def f(x): return x*2 + 10",
    "Don't you think the match's score was 2-1?",
]


def tokenizer_texts() -> list[str]:
    return [r["text"] for r in corpus(300)] + TRAINING_EXTRA * 5


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE (SmolLM2's kind) trained here, with chat-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(tokenizer_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def sentencepiece_tokenizer(kind: str = "LlamaTokenizer"):
    """A SentencePiece-style BPE with byte fallback, laid out by transformers' own Llama (or Gemma) tokenizer:
    `<0xNN>` pieces, merges learned here, BOS added by the post-processor."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tokenizer.train_from_iterator(tokenizer_texts(), trainers.BpeTrainer(vocab_size=300))
    learned = json.loads(tokenizer.to_str())["model"]
    if kind == "LlamaTokenizer":
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    else:
        vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge) if not isinstance(merge, str) else tuple(merge.split(" ")) for merge in learned["merges"]]
    return getattr(transformers, kind)(vocab=vocab, merges=merges, add_bos_token=True)


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "bpe": byte_level_tokenizer(),
        "spm": sentencepiece_tokenizer(),
        "gemma": sentencepiece_tokenizer("GemmaTokenizer"),
    }


def tokenizer_for(tokenizers, model_type: str, kind: str):
    # Gemma files are read by transformers' GGUF loader with Gemma's own SentencePiece conventions
    return tokenizers["gemma" if kind == "spm" and model_type.startswith("gemma") else kind]


SIZE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# Shapes each architecture needs from config, beyond SIZE; values off their defaults where the exporter must carry
# them (Granite's multipliers, StableLM's biases and per-head norms, tied embeddings).
SHAPES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "granite": dict(attention_multiplier=3.0, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0),
    "qwen2": {},
    # transformers' GGUF loader takes Qwen3's default head_dim (128) whatever the file says
    "qwen3": dict(head_dim=128, tie_word_embeddings=True),
    # transformers' GGUF loader and llama.cpp scale Gemma 2/3 queries by 1/sqrt(head_dim): keep the config there
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256),
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256),
    "phi3": {},
    "stablelm": dict(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True),
    "olmo2": {},
}
CONFIGS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "granite": "GraniteConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
    "stablelm": "StableLmConfig",
    "olmo2": "Olmo2Config",
    "gpt2": "GPT2Config",
}
# transformers' GGUF loader reads these architectures (and StableLM without per-head norms)
TRANSFORMERS_LOADS = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2"}


def tiny_decoder(model_type: str, tokenizer, **overrides):
    import transformers

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    if model_type == "gpt2":
        # transformers' GGUF loader keeps GPT-2's default n_positions
        settings = dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    else:
        settings = {**SIZE, **SHAPES[model_type]}
    config = getattr(transformers, CONFIGS[model_type])(**{**settings, **ids, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def export(model, tokenizer, directory, quant="f16"):
    from finetune.outputs.gguf import write_gguf

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    target = directory / "model.gguf"
    write_gguf(model, tokenizer, target, quant=quant, name="tiny", description="card", generation={})
    return target


def fields(target) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(target))
    return {name: field.contents() for name, field in reader.fields.items()}, reader


def decisive(logits: np.ndarray) -> np.ndarray:
    """Positions whose top two logits differ by more than f16 rounding could move them (5% of their spread)."""
    top = np.sort(logits, axis=-1)[:, -2:]
    return (top[:, 1] - top[:, 0]) > 0.05 * logits.std()


ARCHES = sorted(CONFIGS)


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("model_type", ARCHES)
def test_every_architecture_exports_what_llama_cpp_reads(model_type, kind, tokenizers, tmp_path):
    import gguf

    from finetune.outputs.gguf.architectures import ARCHITECTURES

    tokenizer = tokenizer_for(tokenizers, model_type, kind)
    model = tiny_decoder(model_type, tokenizer)
    target = export(model, tokenizer, tmp_path)

    metadata, reader = fields(target)
    arch = ARCHITECTURES[model_type].gguf_arch
    assert metadata["general.architecture"] == gguf.MODEL_ARCH_NAMES[arch]
    assert metadata["tokenizer.ggml.model"] == ("gpt2" if kind == "bpe" else "llama")
    assert metadata["tokenizer.ggml.pre"] == ("gpt-2" if kind == "bpe" else "default")
    assert len(metadata["tokenizer.ggml.tokens"]) == model.config.vocab_size
    allowed = {
        gguf.TENSOR_NAMES[tensor].format(bid=block)
        for tensor in gguf.MODEL_TENSORS[arch]
        for block in range(model.config.num_hidden_layers)
    }
    written = {tensor.name.rsplit(".", 1)[0] for tensor in reader.tensors}
    assert written <= allowed, written - allowed
    # every trained weight went somewhere: the tied head is the embedding, per-head norms stack into one tensor
    state = [name for name in model.state_dict() if not name.endswith("inv_freq")]
    per_head = [name for name in state if ".norms." in name]
    tied = "lm_head.weight" in state and (model.config.tie_word_embeddings or model_type.startswith("gemma"))
    stacks = {name.split(".norms.")[0] for name in per_head}
    assert len(reader.tensors) == len(state) - int(tied) - len(per_head) + len(stacks)

    if model_type in TRANSFORMERS_LOADS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=target.name, dtype=torch.float32).eval()
        read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=target.name)
        for text in HELD_OUT:
            assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"], text
        ids = torch.tensor([tokenizer(" ".join(HELD_OUT))["input_ids"]])
        with torch.no_grad():
            want, got = model(ids).logits[0], loaded(ids).logits[0]
        assert (got - want).abs().max() < 0.05 * want.std(), (got - want).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("model_type", ARCHES)
def test_llama_cpp_runs_every_export_as_transformers_does(model_type, kind, tokenizers, tmp_path):
    """The file in llama.cpp itself: the same token ids for held-out text, the same logits (to f16 rounding)."""
    pytest.importorskip("llama_cpp")
    from finetune.outputs.gguf.parity import _load

    tokenizer = tokenizer_for(tokenizers, model_type, kind)
    model = tiny_decoder(model_type, tokenizer)
    target = export(model, tokenizer, tmp_path)
    llm = _load(target, n_ctx=256, threads=2)
    try:
        for text in HELD_OUT:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
        ids = tokenizer(" ".join(HELD_OUT[:4]))["input_ids"]
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 0.05 * want.std(), np.abs(got - want).max()
    sure = decisive(want)
    assert sure.sum() > len(ids) // 2 and (got.argmax(-1) == want.argmax(-1))[sure].all()


@pytest.mark.unit
def test_unsupported_architectures_are_refused_naming_the_supported():
    from finetune.outputs.gguf.architectures import ARCHITECTURES, export_arch

    with pytest.raises(RecipeError) as refused:
        export_arch("gpt", "gpt_neox")
    assert "'gpt_neox'" in str(refused.value) and ", ".join(sorted(ARCHITECTURES)) in str(refused.value)
    with pytest.raises(RecipeError, match="language-model head"):
        export_arch("gpt", "llama", "sequence_classification")


@pytest.mark.parametrize(
    ("model_type", "overrides", "reason"),
    [
        ("gemma2", dict(query_pre_attn_scalar=224), "query_pre_attn_scalar is 224"),
        (
            "phi3",
            dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 8,
                    "long_factor": [1.0] * 8,
                    "original_max_position_embeddings": 64,
                }
            ),
            "longrope",
        ),
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        ("llama", dict(hidden_act="gelu"), "hidden_act is 'gelu'"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window is set"),
    ],
)
def test_configs_llama_cpp_would_run_differently_are_refused(model_type, overrides, reason, tokenizers, tmp_path):
    tokenizer = tokenizers["bpe"]
    model = tiny_decoder(model_type, tokenizer, **overrides)
    with pytest.raises(RecipeError, match=reason):
        export(model, tokenizer, tmp_path)


@pytest.mark.unit
def test_the_export_guide_lists_every_supported_architecture():
    from pathlib import Path

    from finetune.outputs.gguf.architectures import ARCHITECTURES

    guide = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text(encoding="utf-8")
    table = {row.split("|")[1] for row in guide.splitlines() if row.startswith("| `")}
    listed = {name.strip(" `") for cell in table for name in cell.split(",")}
    assert listed >= set(ARCHITECTURES), set(ARCHITECTURES) - listed
