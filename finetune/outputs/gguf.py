"""A merged decoder as a GGUF file for llama.cpp, Ollama and LM Studio, written with gguf-py.

The adapter is merged into the full-precision base first. Tensor names come
from gguf-py's `TensorNameMap`; the tokenizer (vocabulary, token types, merges,
special tokens, chat template) and the generation settings go into the file's
metadata, with the run's model card and finetune's version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from finetune import __version__
from finetune.errors import RecipeError


@dataclass(frozen=True)
class ExportArch:
    gguf_arch: gguf.MODEL_ARCH
    # llama.cpp's LLaMA layout interleaves the rotary halves of Q and K; Hugging Face keeps them apart.
    permute_qk: bool


# model_type -> how llama.cpp knows it. Others are refused, naming these.
ARCHITECTURES: dict[str, ExportArch] = {
    "llama": ExportArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": ExportArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": ExportArch(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}

QUANTS = {
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def export_arch(family: str, model_type: str) -> ExportArch:
    """The llama.cpp architecture of a checkpoint, or a refusal naming what is supported."""
    supported = ", ".join(sorted(ARCHITECTURES))
    if family != "gpt":
        raise RecipeError(
            f"export --format gguf: only GPT-family decoders export to GGUF (model types: {supported}); "
            f"this is a {family}-family model. Use --format hf for a transformers checkpoint."
        )
    if model_type not in ARCHITECTURES:
        raise RecipeError(
            f"export --format gguf: model type {model_type!r} is not one llama.cpp loads from this "
            f"exporter (supported: {supported}). Use --format hf for a transformers checkpoint."
        )
    return ARCHITECTURES[model_type]


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotary layout -> llama.cpp's (the inverse of transformers' GGUF loader)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    *,
    quant: str,
    name: str,
    description: str,
    generation: dict,
) -> None:
    """Write `model` (merged, full precision) and its tokenizer as one GGUF file at `target`."""
    config = model.config
    arch = export_arch("gpt", config.model_type)
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    _write_metadata(writer, config, quant, name, description, generation)
    _write_tokenizer(writer, tokenizer)
    _write_tensors(writer, model, arch, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_metadata(
    writer: gguf.GGUFWriter, config: PretrainedConfig, quant: str, name: str, description: str, generation: dict
) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_description(description)
    writer.add_string("general.finetune", name)
    writer.add_string("finetune.version", __version__)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta:
        writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config.vocab_size)
    # What the run generated with, as llama.cpp's sampling defaults.
    if generation.get("temperature") is not None:
        writer.add_float32(gguf.Keys.General.SAMPLING_TEMP, float(generation["temperature"]))
    if generation.get("top_p") is not None:
        writer.add_float32(gguf.Keys.General.SAMPLING_TOP_P, float(generation["top_p"]))


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase) -> None:
    """The vocabulary with token types (control for special tokens), merges, special ids and chat template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback", False)
    if model.get("type") != "BPE":
        raise RecipeError(f"export --format gguf: a {model.get('type')} tokenizer is not supported (BPE only)")
    vocab = tokenizer.get_vocab()
    size = max(len(vocab), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not byte_level:
        writer.add_token_scores([0.0] * size)
    merges = model.get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _write_tensors(writer: gguf.GGUFWriter, model: PreTrainedModel, arch: ExportArch, quant: str) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reuses the token embedding
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RecipeError(f"export --format gguf: no GGUF name for tensor {hf_name!r}")
        data = tensor.detach().float()
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_kv)
        array = data.numpy()
        # Norms, biases and other 1-D tensors stay float32, as llama.cpp's converter keeps them.
        kind = QUANTS[quant] if array.ndim > 1 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 wide
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
