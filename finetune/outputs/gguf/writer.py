"""The GGUF file: the architecture's hyperparameters, the tokenizer, the converted tensors, the run's metadata.

The adapter is merged into the full-precision base first (flows/export.py). Tensor types follow llama.cpp's
converter (`ModelBase.prepare_tensors`): 1-D tensors, norms, biases and position embeddings stay float32; the rest
take the requested type, and a tensor Q8_0 cannot block (a row not a multiple of 32) falls back to F16 there too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune import __version__
from finetune.outputs.gguf.architectures import check_config, export_arch, gguf_tensors
from finetune.outputs.gguf.vocab import write_tokenizer

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
ALWAYS_F32 = (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight",)


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    *,
    quant: str,
    name: str,
    description: str,
    generation: dict[str, Any],
) -> None:
    """Write `model` (merged, full precision) and its tokenizer as one GGUF file at `target`."""
    config = model.config
    arch = export_arch("gpt", config.model_type)
    hparams = check_config(arch, config)
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    try:
        writer.add_name(name)
        writer.add_description(description)
        writer.add_string("finetune.version", __version__)
        writer.add_file_type(FILE_TYPES[quant])
        arch.write_params(writer, hparams)
        _sampling(writer, generation)
        write_tokenizer(writer, tokenizer, config)
        for gguf_name, data in gguf_tensors(arch, hparams, model.state_dict()):
            _add_tensor(writer, gguf_name, data.numpy(), QUANTS[quant])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _sampling(writer: gguf.GGUFWriter, generation: dict[str, Any]) -> None:
    """What the run generated with, as llama.cpp's sampling defaults."""
    if generation.get("temperature") is not None:
        writer.add_float32(gguf.Keys.General.SAMPLING_TEMP, float(generation["temperature"]))
    if generation.get("top_p") is not None:
        writer.add_float32(gguf.Keys.General.SAMPLING_TOP_P, float(generation["top_p"]))
    if generation.get("top_k") is not None:
        writer.add_int32(gguf.Keys.General.SAMPLING_TOP_K, int(generation["top_k"]))


def tensor_type(gguf_name: str, array: np.ndarray, wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if array.ndim <= 1 or gguf_name.endswith("_norm.weight") or gguf_name in ALWAYS_F32:
        return gguf.GGMLQuantizationType.F32
    if not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return wanted


def _add_tensor(writer: gguf.GGUFWriter, gguf_name: str, array: np.ndarray, wanted: gguf.GGMLQuantizationType) -> None:
    kind = tensor_type(gguf_name, array, wanted)
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(gguf_name, array.astype(np.float32))
        return
    try:
        data = gguf.quants.quantize(array, kind)
    except gguf.QuantError:
        kind = gguf.GGMLQuantizationType.F16
        data = gguf.quants.quantize(array, kind)
    writer.add_tensor(gguf_name, data, raw_dtype=kind)
