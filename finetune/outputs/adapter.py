"""Saving a trained adapter: peft's files, the tokenizer, what the task needs to use it again, and a base
config so that peft's AutoPeftModel classes load it as it is."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.errors import DataError
from finetune.files import read_json_input, replace_directory, write_json
from finetune.outputs.rundir import ADAPTER_META
from finetune.recipe.schema import WatermarkSection
from finetune.watermark.marking import write_key

log = logging.getLogger("finetune")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
WEIGHTS_FILE = "adapter_model.safetensors"  # peft's name for a saved adapter's weights


@dataclass(frozen=True)
class AdapterSaver:
    """Writes the adapter of a model being trained; checkpoints and the end of a run share it."""

    tokenizer: PreTrainedTokenizerBase
    meta: dict[str, Any]  # task, family, label order / prompt layout, generation settings (finetune.json)
    base_path: str
    revision: str | None = None
    # PiSSA/OLoRA: the adapter as initialised; saving converts the trained one into a plain LoRA on the unchanged base.
    initial_adapter: Path | None = None
    # Generation tasks with eval.watermark: the key goes beside the adapter (0600), never into finetune.json.
    watermark: WatermarkSection | None = None

    def save(self, model: PeftModel, adapter_dir: Path, for_other_tools: bool = False) -> None:
        """Atomically replace `adapter_dir`. `for_other_tools` (the run's final adapter) adds `base/`."""
        staging = adapter_dir.with_name(adapter_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        # Only the trained adapter: a frozen reference adapter loaded beside it (model.adapter) is not the result.
        model.save_pretrained(str(staging), safe_serialization=True, selected_adapters=["default"])
        _sort_target_modules(staging)
        if self.initial_adapter is not None:
            convert_to_plain_lora(staging, self.initial_adapter)
        self.tokenizer.save_pretrained(str(staging))
        write_json(staging / ADAPTER_META, self.meta)
        if self.watermark is not None:
            write_key(staging, self.watermark)
        if for_other_tools:
            write_task_base(model, self.base_path, self.revision, staging, adapter_dir)
        replace_directory(staging, adapter_dir, aside=adapter_dir.with_name(adapter_dir.name + ".old"))


def _sort_target_modules(adapter_dir: Path) -> None:
    """peft keeps `target_modules` as a set and writes it in the set's order, which string hashing makes differ
    from process to process: two runs of one recipe wrote the same weights in adapter_config.json files that differ.
    Sorted, as peft writes everything else (`sort_keys`)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def convert_to_plain_lora(adapter_dir: Path, initial_dir: Path) -> None:
    """A PiSSA/OLoRA adapter rewritten as a plain LoRA on the *unchanged* base, in place.

    These inits move W's principal part into the adapter (W = W_res + B0 A0); after training the model is
    W_res + B A, so the change to the original W is B A - B0 A0 = [B | -B0] [A ; A0]: a LoRA of rank 2r with
    the same scale. peft's own conversion (`path_initial_model_for_weight_conversion`) drops trained heads
    (modules_to_save), so the arithmetic is done here, on the saved tensors; every other tensor is kept.
    """
    import torch

    weights = adapter_dir / WEIGHTS_FILE
    trained, initial = load_file(weights), load_file(initial_dir / WEIGHTS_FILE)
    for name, tensor in trained.items():
        if "lora_A" in name:
            trained[name] = torch.cat([tensor, initial[name]], dim=0).contiguous()
        elif "lora_B" in name:
            trained[name] = torch.cat([tensor, -initial[name]], dim=1).contiguous()
    save_file(trained, weights, metadata={"format": "pt"})
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["r"] *= 2
    config["lora_alpha"] *= 2**0.5 if config.get("use_rslora") else 2  # keeps alpha / r (or / sqrt r) unchanged
    config["init_lora_weights"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_task_base(model: PeftModel, base_path: str, revision: str | None, adapter_dir: Path, final_dir: Path) -> None:
    """`base/` in the adapter being written in `adapter_dir` (which becomes `final_dir`): this task's config (label
    maps, head size, pad token) beside links to the base weights (a copy without the head where the checkpoint's
    head had another shape).

    AutoPeftModelFor... loads `base_model_name_or_path` with the checkpoint's own
    config: two labels and no pad token for a bare encoder or decoder, so a
    trained 5-label head would not fit. Pointing it here instead gives the model
    the adapter was trained on, without copying the base weights.
    """
    source = _local_snapshot(base_path, revision)
    if source is None:
        log.warning("adapter: base weights of %s are not on disk; AutoPeftModel will load the hub config", base_path)
        return
    target = adapter_dir / "base"
    target.mkdir()
    base = model.get_base_model()
    assert isinstance(base, PreTrainedModel)  # peft wraps the transformers model finetune loaded
    base.config.save_pretrained(target)
    if getattr(base, "generation_config", None) is not None and base.can_generate():
        base.generation_config.save_pretrained(target)
    weights = [
        f for f in sorted(source.iterdir()) if f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("adapter_")
    ]
    replaced = _replaced_head_weights(base, weights)
    if replaced:
        # The checkpoint's head had another shape (its own number of labels): linked, its weights would not load
        # into this config. A copy without them loads, the head coming from the adapter.
        kept = {}
        for file in weights:
            if file.suffix == ".safetensors":
                kept.update({k: v for k, v in load_file(str(file)).items() if k not in replaced})
        # As bytes, so the file gets the user's umask (save_file writes 0600); the staging folder's rename makes
        # the adapter appear whole.
        (target / "model.safetensors").write_bytes(save(kept, metadata={"format": "pt"}))
    else:
        for file in weights:
            (target / file.name).symlink_to(file.resolve())
    _point_adapter_at(adapter_dir, final_dir)


def _replaced_head_weights(base: PreTrainedModel, weights: list[Path]) -> set[str]:
    """The checkpoint's weights whose shape differs from the model's (a head made anew for another number of
    labels; load_model allows no other), read from the safetensors headers alone."""
    shapes = {}
    for name, tensor in base.state_dict().items():
        if "lora_" not in name and ".modules_to_save." not in name:  # peft's names for the same weights
            shapes[name.replace(".base_layer", "").replace(".original_module", "")] = tuple(tensor.shape)
    replaced = set()
    for file in weights:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open's handle is not iterable)
                    if key in shapes and tuple(handle.get_slice(key).get_shape()) != shapes[key]:
                        replaced.add(key)
    return replaced


def _point_adapter_at(adapter_dir: Path, final_dir: Path) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(final_dir.resolve() / "base")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _local_snapshot(base_path: str, revision: str | None) -> Path | None:
    if Path(base_path).is_dir():
        return Path(base_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_path, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not a hub id: nothing to link
        return None


# What a task decides from the final evaluation and keeps beside the adapter (Task.adapter_files), each read back
# into the task state under its name: multi-label classification's per-label decision thresholds.
TASK_STATE_FILES = ("thresholds",)


def write_task_files(adapter_dir: Path, documents: dict[str, Any]) -> None:
    """`adapter/<name>.json` for each document a task keeps with its adapter (TASK_STATE_FILES)."""
    for name, document in documents.items():
        assert name in TASK_STATE_FILES, name  # read_adapter_meta reads back only these
        write_json(adapter_dir / f"{name}.json", document)


def read_adapter_meta(adapter_dir: Path) -> dict:
    """finetune.json, with the task's files beside the adapter (TASK_STATE_FILES) in its `state`; every command that
    uses a trained adapter reads it here first, so a damaged adapter is named before anything loads."""
    check_adapter_files(adapter_dir)
    meta = read_json_input(adapter_dir / ADAPTER_META)
    for name in TASK_STATE_FILES:
        path = adapter_dir / f"{name}.json"
        if path.is_file():
            try:
                meta["state"] = {**meta.get("state", {}), name: read_json_input(path)[name]}
            except (KeyError, TypeError):
                raise DataError(f"{path}: damaged (no {name!r} in it)") from None
    return meta


def check_adapter_files(adapter_dir: Path) -> None:
    """The files peft and finetune read from an adapter are there and whole: its JSON files are there (peft's config
    parses; `read_adapter_meta` reads finetune.json just after), its weights file opens (safetensors checks the header against the file's size, so a truncated file fails). A damaged or missing
    one is a DataError naming it (exit 3, as a damaged checkpoint given to --resume), never an internal error from
    inside peft or safetensors."""
    for name in (ADAPTER_META, "adapter_config.json"):
        if not (adapter_dir / name).is_file():
            raise DataError(f"{adapter_dir / name}: missing from the adapter (a damaged run; train it again)")
    read_json_input(adapter_dir / "adapter_config.json")  # finetune.json: read_adapter_meta reads it next
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{weights}: missing from the adapter (a damaged run; train it again)")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{weights}: damaged or truncated ({exc}); train the run again") from None
