"""The decoder architectures llama.cpp runs from this exporter, each with llama.cpp's conversion rules.

One `ExportArch` per transformers `model_type`: the GGUF architecture, the hyperparameters llama.cpp reads (as its
converter writes them: `conversion/*.py` in ggml-org/llama.cpp), and what the tensors need on the way (Q/K rows
permuted where llama.cpp applies rotary embeddings to adjacent pairs, Gemma's RMSNorm weights stored plus one,
GPT-2's Conv1D weights transposed, per-head norms stacked). Tensor names come from gguf-py's `TensorNameMap`.
A config llama.cpp would compute differently (an attention scale it derives, a rotary scaling it lacks) is
refused with the reason, never written to run differently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gguf
import torch
from transformers import PretrainedConfig

from finetune.errors import RecipeError

Hparams = dict[str, Any]


@dataclass(frozen=True)
class ExportArch:
    gguf_arch: gguf.MODEL_ARCH
    # writes the hyperparameters llama.cpp reads for this architecture
    write_params: Callable[[gguf.GGUFWriter, Hparams], None]
    # llama.cpp's "normal" rotary layout rotates adjacent pairs; transformers rotates the two halves of each head
    permute_qk: bool = False
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by w
    norm_shift: float = 0.0
    # weights stored transposed (transformers' Conv1D), by name suffix
    transposed: tuple[str, ...] = ()
    # llama.cpp reads the output projection from the token embedding (no separate lm_head in the file)
    drop_lm_head: bool = False
    # the MLP activations llama.cpp's graph computes (transformers' names for it), and the config keys naming the model's
    activation: tuple[tuple[str, ...], tuple[str, ...]] = (("silu", "swish"), ("hidden_act",))
    # rotary scalings llama.cpp reproduces for this architecture
    rope_types: frozenset[str] = frozenset({"default", "linear", "yarn"})
    checks: tuple[Callable[[Hparams], str | None], ...] = field(default=())


def find(hparams: Hparams, *keys: str, default: Any = None) -> Any:
    """The first of `keys` the config sets (llama.cpp's `find_hparam`)."""
    for key in keys:
        if hparams.get(key) is not None:
            return hparams[key]
    return default


def rope_parameters(hparams: Hparams, layer: str = "full_attention") -> dict[str, Any]:
    """transformers 5's `rope_parameters` (per layer type where it has them), older `rope_scaling`/`rope_theta`."""
    everything: dict[str, Any] = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    parameters = dict(everything.get(layer) or everything)
    if "rope_theta" not in parameters and hparams.get("rope_theta") is not None:
        parameters["rope_theta"] = hparams["rope_theta"]
    if "partial_rotary_factor" not in parameters and hparams.get("partial_rotary_factor") is not None:
        parameters["partial_rotary_factor"] = hparams["partial_rotary_factor"]
    return parameters


def head_dim(hparams: Hparams) -> int:
    return int(
        hparams.get("head_dim")
        or find(hparams, "hidden_size", "n_embd") // find(hparams, "num_attention_heads", "n_head")
    )


def _text_model(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """llama.cpp's `TextModel.set_gguf_parameters`, for the keys these architectures have."""
    writer.add_block_count(find(hparams, "num_hidden_layers", "n_layer"))
    writer.add_context_length(find(hparams, "max_position_embeddings", "n_positions"))
    writer.add_embedding_length(find(hparams, "hidden_size", "n_embd"))
    writer.add_feed_forward_length(find(hparams, "intermediate_size", "n_inner"))
    writer.add_head_count(find(hparams, "num_attention_heads", "n_head"))
    writer.add_head_count_kv(find(hparams, "num_key_value_heads", "num_attention_heads"))
    rope = rope_parameters(hparams)
    kind = rope.get("rope_type") or rope.get("type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("extrapolation_factor") is not None:
            writer.add_rope_scaling_yarn_ext_factor(rope["extrapolation_factor"])
        if find(rope, "attention_factor", "attn_factor") is not None:
            writer.add_rope_scaling_yarn_attn_factor(find(rope, "attention_factor", "attn_factor"))
        if rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    sliding = rope_parameters(hparams, "sliding_attention")
    if "sliding_attention" in (hparams.get("rope_parameters") or {}) and sliding.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    if hparams.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if find(hparams, "layer_norm_eps", "layer_norm_epsilon") is not None:
        writer.add_layer_norm_eps(find(hparams, "layer_norm_eps", "layer_norm_epsilon"))
    if hparams.get("head_dim") is not None:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])


def _llama(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """`LlamaModel.set_gguf_parameters`: the text model, the vocabulary size and the rotary dimensions."""
    _text_model(writer, hparams)
    writer.add_vocab_size(hparams["vocab_size"])
    writer.add_rope_dimension_count(head_dim(hparams))


def _granite(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """`GraniteModel`: Llama without head_dim, and its four multipliers as llama.cpp's scales."""
    _llama(writer, {key: value for key, value in hparams.items() if key != "head_dim"})
    if hparams.get("attention_multiplier"):
        writer.add_attention_scale(hparams["attention_multiplier"])
    if hparams.get("embedding_multiplier"):
        writer.add_embedding_scale(hparams["embedding_multiplier"])
    if hparams.get("residual_multiplier"):
        writer.add_residual_scale(hparams["residual_multiplier"])
    if hparams.get("logits_scaling"):
        writer.add_logit_scale(hparams["logits_scaling"])


def _sliding_pattern(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """Which layers attend in a window, from the config's own `layer_types` (llama.cpp reads the array)."""
    if hparams.get("layer_types"):
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in hparams["layer_types"]])


def _gemma(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """`GemmaModel`/`Gemma2Model.set_gguf_parameters` (rotary base left at llama.cpp's 10000, as there)."""
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(find(hparams, "num_key_value_heads", "num_attention_heads"))
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_key_length(hparams["head_dim"])
    writer.add_value_length(hparams["head_dim"])
    if hparams.get("attn_logit_softcapping") is not None:  # Gemma 2
        writer.add_attn_logit_softcapping(hparams["attn_logit_softcapping"])
    if hparams.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(hparams["final_logit_softcapping"])
    if hparams.get("sliding_window") is not None:
        writer.add_sliding_window(hparams["sliding_window"])
        _sliding_pattern(writer, hparams)


def _gemma3(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """`Gemma3Model.set_gguf_parameters`: the text model, the global rotary base, soft-capping, the window."""
    _text_model(writer, hparams)
    if rope_parameters(hparams).get("rope_theta") is None:  # _text_model wrote it otherwise
        writer.add_rope_freq_base(1_000_000.0)
    if hparams.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(hparams["final_logit_softcapping"])
    if hparams.get("sliding_window") is not None and any(
        kind == "sliding_attention" for kind in hparams.get("layer_types") or ()
    ):
        writer.add_sliding_window(hparams["sliding_window"])
        _sliding_pattern(writer, hparams)


def _phi3(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """`Phi3MiniModel.set_gguf_parameters`: partial rotary dimensions, the original context, the window (0: none)."""
    rope = rope_parameters(hparams)
    n_embd, n_head = hparams["hidden_size"], hparams["num_attention_heads"]
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(
        find(rope, "original_max_position_embeddings", default=hparams.get("original_max_position_embeddings"))
    )
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_sliding_window(hparams.get("sliding_window") or 0)


def _gpt2(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """`GPT2Model.set_gguf_parameters` (the MLP width from n_inner when the config sets one)."""
    writer.add_block_count(hparams["n_layer"])
    writer.add_context_length(hparams["n_positions"])
    writer.add_embedding_length(hparams["n_embd"])
    writer.add_feed_forward_length(hparams.get("n_inner") or 4 * hparams["n_embd"])
    writer.add_head_count(hparams["n_head"])
    writer.add_layer_norm_eps(hparams["layer_norm_epsilon"])


def _stablelm(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """`StableLMModel.set_gguf_parameters`: partial rotary dimensions, parallel residual, LayerNorm epsilon."""
    rope = rope_parameters(hparams)
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_rope_dimension_count(int(rope["partial_rotary_factor"] * head_dim(hparams)))
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_parallel_residual(bool(hparams.get("use_parallel_residual", True)))
    writer.add_layer_norm_eps(hparams["layer_norm_eps"])


def _olmo2(writer: gguf.GGUFWriter, hparams: Hparams) -> None:
    """`Olmo2Model.set_gguf_parameters`: the text model (and the window, for configs that have one)."""
    _text_model(writer, hparams)
    if hparams.get("sliding_window") is not None:
        writer.add_sliding_window(hparams["sliding_window"])
        _sliding_pattern(writer, hparams)


def _gemma_attention_scale(hparams: Hparams) -> str | None:
    """llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim), except in the 27B shapes (by layer count), where it
    uses hidden_size / heads; transformers by query_pre_attn_scalar. Only configs where the two agree export."""
    scalar = hparams.get("query_pre_attn_scalar")
    if scalar is None:
        return None
    big = {"gemma2": 46, "gemma3_text": 62}.get(hparams.get("model_type", ""))
    derived = (
        hparams["hidden_size"] // hparams["num_attention_heads"]
        if hparams["num_hidden_layers"] == big
        else hparams["head_dim"]
    )
    if scalar != derived:
        return f"query_pre_attn_scalar is {scalar}, but llama.cpp scales queries by 1/sqrt({derived}) for this shape"
    return None


def _whole_context(hparams: Hparams) -> str | None:
    if hparams.get("use_sliding_window"):
        return "use_sliding_window is set; llama.cpp's graph for this architecture attends to the whole context"
    return None


def _gpt2_attention(hparams: Hparams) -> str | None:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hparams.get(key):
            return f"{key} is set; llama.cpp's GPT-2 graph has no such scaling"
    if hparams.get("scale_attn_weights") is False:
        return "scale_attn_weights is false; llama.cpp always scales attention by 1/sqrt(head_dim)"
    return None


# GELU's tanh approximation, as ggml computes it
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")
GEMMA_ACTIVATION = (GELU_TANH, ("hidden_activation", "hidden_act"))
LLAMA_ROPE = frozenset({"default", "linear", "yarn", "llama3"})

# model_type -> how llama.cpp runs it. Others are refused, naming these.
ARCHITECTURES: dict[str, ExportArch] = {
    "llama": ExportArch(gguf.MODEL_ARCH.LLAMA, _llama, permute_qk=True, rope_types=LLAMA_ROPE),
    "mistral": ExportArch(gguf.MODEL_ARCH.LLAMA, _llama, permute_qk=True, rope_types=LLAMA_ROPE),
    "granite": ExportArch(gguf.MODEL_ARCH.GRANITE, _granite, permute_qk=True),
    "qwen2": ExportArch(gguf.MODEL_ARCH.QWEN2, _text_model, checks=(_whole_context,)),
    "qwen3": ExportArch(gguf.MODEL_ARCH.QWEN3, _text_model, checks=(_whole_context,)),
    "gemma": ExportArch(gguf.MODEL_ARCH.GEMMA, _gemma, norm_shift=1.0, drop_lm_head=True, activation=GEMMA_ACTIVATION),
    "gemma2": ExportArch(
        gguf.MODEL_ARCH.GEMMA2,
        _gemma,
        norm_shift=1.0,
        drop_lm_head=True,
        activation=GEMMA_ACTIVATION,
        rope_types=frozenset({"default"}),
        checks=(_gemma_attention_scale,),
    ),
    "gemma3_text": ExportArch(
        gguf.MODEL_ARCH.GEMMA3,
        _gemma3,
        norm_shift=1.0,
        drop_lm_head=True,
        activation=GEMMA_ACTIVATION,
        checks=(_gemma_attention_scale,),
    ),
    "phi3": ExportArch(gguf.MODEL_ARCH.PHI3, _phi3, rope_types=frozenset({"default"})),
    "gpt2": ExportArch(
        gguf.MODEL_ARCH.GPT2,
        _gpt2,
        transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
        activation=(GELU_TANH, ("activation_function",)),
        rope_types=frozenset({"default"}),
        checks=(_gpt2_attention,),
    ),
    "stablelm": ExportArch(gguf.MODEL_ARCH.STABLELM, _stablelm, rope_types=frozenset({"default"})),
    "olmo2": ExportArch(gguf.MODEL_ARCH.OLMO2, _olmo2),
}


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def export_arch(family: str, model_type: str, head: str = "generation") -> ExportArch:
    """The llama.cpp architecture of a checkpoint, or a refusal naming what is supported."""
    if family != "gpt" or head != "generation":
        what = f"a {family}-family model" if family != "gpt" else f"a {head} head"
        raise RecipeError(
            f"export --format gguf: only GPT-family decoders with their language-model head export to GGUF "
            f"(model types: {supported()}); this is {what}. Use --format hf for a transformers checkpoint."
        )
    if model_type not in ARCHITECTURES:
        raise RecipeError(
            f"export --format gguf: model type {model_type!r} is not one llama.cpp loads from this "
            f"exporter (supported: {supported()}). Use --format hf for a transformers checkpoint."
        )
    return ARCHITECTURES[model_type]


def check_config(arch: ExportArch, config: PretrainedConfig) -> Hparams:
    """The config as llama.cpp's converter reads config.json, after refusing what llama.cpp would run otherwise."""
    hparams: Hparams = config.to_dict()
    problems: list[str] = []
    wanted, keys = arch.activation
    activation = find(hparams, *keys)
    if activation is not None and activation not in wanted:
        problems.append(
            f"{keys[0]} is {activation!r}; llama.cpp's {arch.gguf_arch.name.lower()} graph uses {wanted[0]}"
        )
    for layer in ("full_attention", "sliding_attention"):
        rope = rope_parameters(hparams, layer)
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind not in arch.rope_types:
            problems.append(f"rotary scaling {kind!r} (llama.cpp reproduces {sorted(arch.rope_types)} here)")
            break
    problems += [problem for check in arch.checks if (problem := check(hparams))]
    if problems:
        raise RecipeError(f"export --format gguf: this {config.model_type} config {'; '.join(problems)}.")
    return hparams


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotary layout -> llama.cpp's (llama.cpp's `LlamaModel.permute`)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama3_rope_factors(hparams: Hparams) -> torch.Tensor | None:
    """The `rope_freqs` tensor llama.cpp needs for Llama 3's rotary scaling (`LlamaModel.generate_extra_tensors`)."""
    rope = rope_parameters(hparams)
    if (rope.get("rope_type") or "").lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = head_dim(hparams)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def gguf_tensors(
    arch: ExportArch, hparams: Hparams, state: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every weight llama.cpp reads, converted by the architecture's rules."""
    n_layer = find(hparams, "num_hidden_layers", "n_layer")
    names = gguf.get_tensor_name_map(arch.gguf_arch, n_layer)
    n_head = find(hparams, "num_attention_heads", "n_head")
    n_kv = find(hparams, "num_key_value_heads", default=n_head)
    state = dict(state)
    if arch.drop_lm_head or hparams.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # llama.cpp reuses the token embedding
    per_head: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for hf_name, tensor in state.items():
        if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
            continue  # buffers transformers recomputes, not weights
        data = tensor.detach().to(torch.float32)
        if ".norms." in hf_name:
            # StableLM's per-head q/k LayerNorms: llama.cpp reads them stacked, one row per head
            stem, _, rest = hf_name.partition(".norms.")
            index, _, suffix = rest.partition(".")
            per_head.setdefault(f"{stem}.{suffix}", []).append((int(index), data))
            continue
        yield _named(names, hf_name), _converted(arch, hf_name, data, n_head, n_kv)
    for stacked_name, rows in per_head.items():
        yield _named(names, stacked_name), torch.stack([row for _, row in sorted(rows, key=lambda pair: pair[0])])
    if arch.permute_qk and (factors := llama3_rope_factors(hparams)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def _named(names: gguf.TensorNameMap, hf_name: str) -> str:
    gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise RecipeError(f"export --format gguf: no GGUF name for tensor {hf_name!r}")
    return gguf_name


def _converted(arch: ExportArch, hf_name: str, data: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        data = permute(data, n_head)
    elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        data = permute(data, n_kv)
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        data = data + arch.norm_shift
    if hf_name.endswith(arch.transposed):
        data = data.transpose(0, 1).contiguous()
    return data
