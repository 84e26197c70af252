"""Tiny real checkpoints built from config, with tokenizers trained here in a second.

They run the real transformers, peft and accelerate code paths, offline and fast.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers (make test runs them) export COLUMNS=80, and rich fixes a console's width from it when the
# console is made, at import: tests that widen the terminal per command (helpers.WIDE) would still see 80 columns.
os.environ.pop("COLUMNS", None)
if "PYTEST_XDIST_WORKER" in os.environ:
    # Several test processes share the cores: one OpenMP thread each (and in the runs they start), or the threads
    # of one spin while the other's hold the cores, and both run many times slower than alone.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Feature cache, GGUF conversions and embeddings go to this session's own directory, never the user's.

    Under xdist the test processes of one run share the GGUF conversions (about 30 s of CPU each, once per
    process before): a conversion is built aside and renamed into place, so two processes converting at once
    both end with the same complete checkpoint."""
    cache = tmp_path_factory.mktemp("finetune-cache")
    os.environ["FINETUNE_CACHE"] = str(cache)
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = tmp_path_factory.getbasetemp().parent / "shared-gguf"  # the run's own root, above each process's
        shared.mkdir(exist_ok=True)
        (cache / "gguf").symlink_to(shared, target_is_directory=True)


WORDS = {
    "sports": "match goal team player coach league score season win stadium",
    "weather": "rain sun cloud storm wind snow forecast cold warm temperature",
    "cooking": "recipe oven salt pepper bake boil flour sugar dinner kitchen",
}


def corpus(n: int = 300, seed: int = 0) -> list[dict]:
    """Short texts whose topic is readable from their words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(WORDS)[i % len(WORDS)]
        words = WORDS[label].split()
        length = rng.randint(4, 14)
        rows.append({"text": " ".join(rng.choice(words) for _ in range(length)), "label": label})
    return rows


def _train_tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = [r["text"] for r in corpus(200)] + ["def add ( a , b ) : return a + b", "question answer context the of"]
    specials = {
        "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        "bart": ["<pad>", "<unk>", "<s>", "</s>", "<mask>"],
        "gpt": ["<unk>", "<|endoftext|>"],
    }[kind]
    tokenizer = Tokenizer(models.WordPiece(unk_token=specials[1]) if kind == "bert" else models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer_cls = trainers.WordPieceTrainer if kind == "bert" else trainers.BpeTrainer
    tokenizer.train_from_iterator(text, trainer_cls(vocab_size=200, special_tokens=specials))
    if kind in ("bert", "bart"):
        start, end = ("[CLS]", "[SEP]") if kind == "bert" else ("<s>", "</s>")
        pair = f"{start} $A {end} $B {end}" if kind == "bert" else f"{start} $A {end} {end} $B {end}"
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{start} $A {end}",
            pair=pair,
            special_tokens=[(start, tokenizer.token_to_id(start)), (end, tokenizer.token_to_id(end))],
        )
        names = (
            "pad_token",
            "unk_token",
            "cls_token" if kind == "bert" else "bos_token",
            "sep_token" if kind == "bert" else "eos_token",
            "mask_token",
        )
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **dict(zip(names, specials)))
    # GPT-style: no pad token, like GPT-2 and many decoders.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def build_tiny(kind: str, directory: Path) -> Path:
    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        BartConfig,
        BertConfig,
        GPT2Config,
        LlamaConfig,
    )

    torch.manual_seed(0)
    family = {"bert": "bert", "bart": "bart", "gpt2": "gpt", "llama": "gpt"}[kind]
    tokenizer = _train_tokenizer(family)
    vocab = len(tokenizer)
    if kind == "bert":
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModel.from_config(config)
    elif kind == "bart":
        config = BartConfig(
            vocab_size=vocab,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=None,
        )
        model = AutoModelForSeq2SeqLM.from_config(config)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny(kind, root / kind) for kind in ("bert", "bart", "gpt2", "llama")}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def topic_data(tmp_path) -> dict[str, Path]:
    rows = corpus(150)
    return {
        "train": write_jsonl(tmp_path / "data" / "train.jsonl", rows[:120]),
        "eval": write_jsonl(tmp_path / "data" / "eval.jsonl", rows[120:]),
    }


def classification_recipe(model_dir: Path, data: dict[str, Path], out: Path, **train) -> dict:
    return {
        "task": "classification",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "targets": "all_linear"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "seed": 0, "precision": "fp32", **train},
        "output": {"dir": str(out)},
    }


@pytest.fixture()
def write_recipe(tmp_path):
    import yaml

    def write(recipe: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write
