"""Model references, family detection, and loading the task's Auto class.

References (docs/guide.md "Model references"): a hub id, a local `save_pretrained` directory,
`pkg:MODULE/SUBDIR` (a checkpoint inside an installed package, found without
importing it), or a GGUF file (`FILE.gguf` or `DIR::FILE.gguf`), which is
dequantised once into a plain float checkpoint cached by the file's hash.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import RecipeError
from finetune.files import sha256_file
from finetune.models.families import FAMILIES, FamilySpec, family_of_config

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("finetune")


def cache_root() -> Path:
    """$FINETUNE_CACHE, or ~/.cache/finetune where it is unset or empty (an empty value, common in CI files, put the
    cache in the working directory); a leading ~ is the home directory (quoted in a YAML env block, it made a
    folder named "~" there)."""
    setting = os.environ.get("FINETUNE_CACHE", "").strip()
    return Path(setting).expanduser() if setting else Path.home() / ".cache" / "finetune"


def _package_dir(module: str, key: str = "model.name_or_path") -> Path:
    """Where an installed package lives, without running its __init__ (some import missing modules)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"{key}: package {module!r} is not installed (pkg:{module}/...)")
    return Path(list(spec.submodule_search_locations)[0])


def package_path(reference: str, key: str) -> Path:
    """`pkg:MODULE/SUB/PATH` -> the path inside the installed package (data files, checkpoints)."""
    module, _, subpath = reference[4:].partition("/")
    return _package_dir(module, key) / subpath


def _split_gguf(reference: str) -> tuple[str, str] | None:
    """`DIR::FILE.gguf` or `path/FILE.gguf` -> (directory or hub id, file name)."""
    if "::" in reference:
        directory, file = reference.split("::", 1)
        return os.path.expanduser(directory), file
    if reference.endswith(".gguf"):
        path = Path(reference).expanduser()
        return str(path.parent), path.name
    return None


def missing_local_path(reference: str) -> str | None:
    """The refusal for a reference written as a local path (/, ./, ../, ~) to nothing (for `DIR::FILE.gguf` and
    `path/FILE.gguf`, the GGUF file itself); None otherwise."""
    if not reference.startswith(("/", "./", "../", "~")):
        return None
    gguf = _split_gguf(reference)
    if gguf is not None:
        path = Path(os.path.join(*gguf))
        return None if path.is_file() else f"model.name_or_path: GGUF file not found: {path}"
    return None if Path(reference).expanduser().exists() else f"model.name_or_path: no such directory: {reference}"


def resolve_reference(reference: str) -> str:
    """Turn a model reference into something `from_pretrained` accepts (a directory or a hub id).

    GGUF files are converted (once) into a cached float checkpoint directory.
    """
    if reference.startswith("pkg:"):
        path = package_path(reference, "model.name_or_path")
        if not path.exists():
            raise RecipeError(f"model.name_or_path: {reference}: not found inside its package ({path})")
        reference = str(path)
        if path.is_dir():
            return reference
    gguf = _split_gguf(reference)
    if gguf:
        directory, file = gguf
        if directory.startswith("pkg:"):
            directory = resolve_reference(directory)
        return str(dequantised_gguf(directory, file))
    if (missing := missing_local_path(reference)) is not None:
        raise RecipeError(missing)
    if Path(reference).exists() and not Path(reference).is_dir():
        raise RecipeError(f"model.name_or_path: {reference} is a file; give a checkpoint directory or a .gguf file")
    return reference


def cache_unwritable(what: str, where: Path, exc: OSError, instead: str) -> None:
    """A cache that cannot be written (read-only, full, a file in its place) is no error of the command: it goes on
    uncached (`instead`), and says where the cache is and how to move it."""
    log.warning(
        "%s cache %s is not writable (%s); %s (FINETUNE_CACHE sets where the cache is)",
        what,
        where,
        exc.strerror or exc,
        instead,
    )


def reference_is_local(reference: str) -> bool:
    """True where loading the reference needs no download (pkg:, a directory, a local GGUF file)."""
    if reference.startswith("pkg:"):
        return True
    gguf = _split_gguf(reference)
    path = Path(os.path.join(*gguf)) if gguf else Path(reference)
    return path.exists()


def gguf_checkpoint(local: Path) -> Path:
    """Where the float checkpoint converted from a GGUF file is cached: by the file's SHA-256."""
    stat = local.stat()
    return cache_root() / "gguf" / _gguf_digest(str(local.resolve()), stat.st_size, stat.st_mtime_ns)[:24]


@functools.lru_cache(maxsize=8)
def _gguf_digest(path: str, size: int, modified_ns: int) -> str:
    """The file's SHA-256, once per process and version of the file (size and mtime are the key): a command asks
    for the config and then the weights of the same GGUF, and hashing a multi-GB file twice costs seconds."""
    return sha256_file(Path(path))


def dequantised_gguf(directory: str, file: str) -> Path:
    """A plain float checkpoint rebuilt from a GGUF file, cached under the file's SHA-256.

    transformers dequantises GGUF on load but marks the model quantized (it will
    not train or save as a normal checkpoint), so the weights are moved into a
    model built from the config alone and saved with its tokenizer.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = Path(directory) / file
    if not local.is_file():
        if Path(directory).exists():
            raise RecipeError(f"model.name_or_path: GGUF file not found: {local}")
        from huggingface_hub import hf_hub_download

        try:
            local = Path(hf_hub_download(directory, file))
        except Exception as exc:  # network or missing repo: a reference problem
            raise RecipeError(f"model.name_or_path: cannot fetch {file} from {directory}: {exc}") from None
    target = gguf_checkpoint(local)
    if (target / "config.json").is_file():
        return target

    log.info("dequantising %s into %s (once)", local, target)
    try:
        config = AutoConfig.from_pretrained(str(local.parent), gguf_file=local.name)
        tokenizer = AutoTokenizer.from_pretrained(str(local.parent), gguf_file=local.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(local.parent), gguf_file=local.name, dtype=torch.float32)
    except Exception as exc:
        raise RecipeError(f"model.name_or_path: cannot read GGUF file {local}: {exc}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    except OSError as exc:  # a read-only cache: converted for this process alone, as an uncached feature table is
        cache_unwritable("model", target.parent, exc, "the GGUF file is converted for this command only")
        scratch = Path(tempfile.mkdtemp(prefix="finetune-gguf-"))
        atexit.register(shutil.rmtree, scratch, True)
        staging = target = scratch / "checkpoint"
        staging.mkdir()
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"{local}\n", encoding="utf-8")
    except BaseException:  # a full disk, Ctrl-C: no half-written conversion stays in the cache
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if staging == target:
        return target
    try:
        staging.rename(target)
    except OSError:  # another process finished first; theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- family


def load_config(
    path: str, *, revision: str | None = None, trust_remote_code: bool = False, local_only: bool = False
) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except Exception as exc:
        raise RecipeError(f"model.name_or_path: cannot load a model config from {path!r}: {_first_line(exc)}") from None


def config_without_weights(reference: str, revision: str | None = None) -> PretrainedConfig | None:
    """The checkpoint's config where it can be read without downloading or converting; else None."""
    from transformers import AutoConfig

    if (missing := missing_local_path(reference)) is not None:
        raise RecipeError(missing)
    if not reference_is_local(reference):
        try:
            return AutoConfig.from_pretrained(reference, revision=revision, local_files_only=True)
        except Exception:
            return None
    gguf = _split_gguf(reference)
    if gguf:
        directory, file = gguf
        if directory.startswith("pkg:"):
            directory = resolve_reference(directory)
        if not (Path(directory) / file).is_file():
            raise RecipeError(f"model.name_or_path: GGUF file not found: {Path(directory) / file}")
        converted = gguf_checkpoint(Path(directory) / file)
        if (converted / "config.json").is_file():  # converted before: its config.json, not the GGUF's metadata parse
            return load_config(str(converted), local_only=True)
        try:
            return AutoConfig.from_pretrained(directory, gguf_file=file)
        except Exception as exc:
            raise RecipeError(f"model.name_or_path: cannot read GGUF file {file}: {_first_line(exc)}") from None
    return load_config(resolve_reference(reference), local_only=True)


def detect_family(config: PretrainedConfig, forced: str = "auto") -> FamilySpec:
    """The family spec of a checkpoint's config; `forced` (model.family) wins when set."""
    if forced != "auto":
        return FAMILIES[forced]
    name = family_of_config(config)
    if name is None:
        raise RecipeError(
            f"model: cannot tell the family of model_type {getattr(config, 'model_type', '?')!r}; "
            "set model.family to bert, bart or gpt"
        )
    return FAMILIES[name]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- loading


def load_tokenizer(
    path: str,
    family: FamilySpec | str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    config: PretrainedConfig | None = None,
) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with a pad token for GPT-style models.

    GPT-style checkpoints often have no pad token. We reuse EOS as the pad token
    rather than adding a new embedding row: padded positions are masked out of
    attention and loss, and the classification head reads the last non-pad
    token, which is never EOS because inputs are not terminated with EOS there.
    """
    from transformers import AutoTokenizer

    try:
        # `config`, when the caller has read it, spares AutoTokenizer a second read of config.json.
        extra = {"config": config} if config is not None else {}
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, **extra)
    except Exception as exc:
        raise RecipeError(f"model.name_or_path: cannot load a tokenizer from {path!r}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RecipeError(f"model: tokenizer of {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(setting: str) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for `distributed.quantization`; refused where it cannot run."""
    if setting == "none":
        return None
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            "distributed.quantization: 4bit (QLoRA) needs a CUDA GPU; this machine has none. "
            "Use quantization: none (LoRA on the full-precision base) here."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            "distributed.quantization: 4bit (QLoRA) needs the bitsandbytes package (pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


def load_model(
    auto_class: type[Any],
    path: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    new_heads: tuple[str, ...] = (),
    announce: bool = True,
    **kwargs: Any,
) -> PreTrainedModel:
    """The checkpoint as `auto_class`, in float32. `new_heads`: the task's head modules, which may have another
    shape in the checkpoint (a sentiment classifier's 2 outputs, tuned for 3 topics): those start anew, said in the
    log (`announce`: when training starts them); a weight of any other module whose shape differs from the config's is
    a damaged checkpoint, refused."""
    import torch

    if trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with %s will run", path)
    try:
        model, info = auto_class.from_pretrained(
            path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
            ignore_mismatched_sizes=True,  # checked below: only the task's head may differ
            output_loading_info=True,
            **kwargs,
        )
    except ValueError as exc:  # e.g. no head of this kind for the architecture
        raise RecipeError(f"model: {path!r} cannot be loaded as {auto_class.__name__}: {_first_line(exc)}") from None
    except OSError as exc:
        raise RecipeError(f"model.name_or_path: cannot load {path!r}: {_first_line(exc)}") from None
    mismatched = sorted(key for key, *_ in info.get("mismatched_keys") or ())
    outside_heads = [key for key in mismatched if not set(key.split(".")) & set(new_heads)]
    if outside_heads:
        raise RecipeError(
            f"model.name_or_path: {path!r} holds weights whose shapes differ from its config: {', '.join(outside_heads)}"
        )
    if mismatched and announce:  # said when training starts a head; a trained adapter brings its own
        log.warning(
            "%s: the checkpoint's %s had another shape (another number of labels): not used, the task's own head replaces them",
            path,
            ", ".join(mismatched),
        )
    return model
