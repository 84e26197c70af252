"""GGUF out: a fine-tuned Llama-family decoder exported with gguf-py, read back by gguf's reader and by
transformers' GGUF loader, against the run's merged checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import WORDS, classification_recipe, corpus, write_jsonl
from helpers import invoke

from tests.tasks.test_generation import copy_rows, generation_recipe


@pytest.fixture(scope="module")
def byte_level_llama(tmp_path_factory):
    """A tiny Llama with a GPT-2-style byte-level BPE tokenizer (SmolLM2's kind) and chat-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    texts = [r["text"] for r in corpus(200)] + [" ".join(WORDS[t].split()[:4]) for t in WORDS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    directory = tmp_path_factory.mktemp("byte-level-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def copy_run(byte_level_llama, tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("gguf-run")
    rows = copy_rows(48)
    data = {"train": write_jsonl(root / "train.jsonl", rows[:40]), "eval": write_jsonl(root / "eval.jsonl", rows[40:])}
    recipe = generation_recipe("copywriting", byte_level_llama, data, root / "run", train={"epochs": 2})
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    assert f"finetune export {root / 'run'} --format gguf --output model.gguf" in result.output
    quantised = invoke("export", root / "run", "--format", "hf", "--quant", "q8_0", "--output", root / "merged")
    assert quantised.exit_code == 2 and "--quant q8_0: quantises a GGUF file" in quantised.output  # was ignored
    merged = invoke("export", root / "run", "--format", "hf", "--output", root / "merged")
    assert merged.exit_code == 0, merged.output
    return root


@pytest.mark.parametrize(("quant", "atol", "agreement"), [("f16", 2e-2, 1.0), ("q8_0", 0.15, 0.95)])
def test_gguf_round_trip_matches_the_merged_model(quant, atol, agreement, copy_run):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = copy_run / f"model-{quant}.gguf"
    result = invoke("export", copy_run / "run", "--format", "gguf", "--quant", quant, "--output", target)
    assert result.exit_code == 0, result.output

    reader = GGUFReader(str(target))
    fields = {name: field for name, field in reader.fields.items()}
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "llama"
    description = bytes(fields["general.description"].parts[-1]).decode()
    assert "LoRA adapter for **copywriting**" in description
    # the run's card, not an earlier export's section of it (a second export carried the first one's path)
    assert "Exported as GGUF" not in description
    assert f"Exported as GGUF: `{target.resolve()}`" in (copy_run / "run" / "README.md").read_text()
    assert "finetune.version" in fields and "tokenizer.ggml.merges" in fields
    assert len(reader.tensors) == 2 * 9 + 3  # 9 tensors a block, embeddings, final norm, output

    merged = AutoModelForCausalLM.from_pretrained(copy_run / "merged").eval()
    loaded = AutoModelForCausalLM.from_pretrained(copy_run, gguf_file=target.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(copy_run / "merged")
    gguf_tokenizer = AutoTokenizer.from_pretrained(copy_run, gguf_file=target.name)
    texts = ["rain sun cloud storm", "match goal team player coach", "recipe oven salt pepper <|im_end|>"]
    for text in texts:  # the tokenizer round trip: same ids
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids = torch.tensor([tokenizer(" ".join(texts))["input_ids"]])
    with torch.no_grad():
        want, got = merged(ids).logits[0], loaded(ids).logits[0]
    assert torch.allclose(got, want, atol=atol), (got - want).abs().max()
    same_next = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert same_next >= agreement
    card = (copy_run / "run" / "README.md").read_text()
    assert "## Run it elsewhere" in card and f"FROM {target.resolve()}" in card


def test_gguf_export_refuses_what_llama_cpp_would_not_load(tiny_models, topic_data, write_recipe, tmp_path, copy_run):
    out = tmp_path / "bert-run"
    recipe = classification_recipe(tiny_models["bert"], topic_data, out, epochs=1)
    trained = invoke("run", write_recipe(recipe))
    assert trained.exit_code == 0
    # The end of the run suggests the export this run has (it suggested a GGUF export that exits 2).
    assert (
        f"finetune export {out} --format hf --output merged/" in trained.output
        and "--format gguf" not in trained.output
    )
    refused = invoke("export", out, "--format", "gguf", "--output", tmp_path / "x.gguf")
    assert refused.exit_code == 2 and "only GPT-family decoders" in refused.output and "llama" in refused.output
    assert not (tmp_path / "x.gguf").exists()
    taken = tmp_path / "taken.gguf"
    taken.write_text("mine")
    refused = invoke("export", copy_run / "run", "--output", taken)
    assert refused.exit_code == 2 and taken.read_text() == "mine"
    refused = invoke("export", copy_run / "run", "--output", tmp_path / "x.gguf", "--quant", "q4")
    assert refused.exit_code == 2 and "--quant" in refused.output


def test_verify_refuses_clearly_without_llama_cpp(copy_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importlib finds no llama_cpp
    refused = invoke("export", copy_run / "run", "--output", tmp_path / "v.gguf", "--verify")
    assert refused.exit_code == 2 and "llama-cpp-python is not installed" in refused.output
    assert not (tmp_path / "v.gguf").exists()


def test_an_export_from_a_read_only_run_is_a_success(copy_run, tmp_path, monkeypatch, caplog):
    """The GGUF was written whole, then updating the run's card on a read-only filesystem made it exit 2, and the
    retry was refused as an earlier GGUF file."""
    from finetune.outputs import card

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(card, "add_run_elsewhere", read_only)
    exported = invoke("export", copy_run / "run", "--output", tmp_path / "r.gguf")
    assert exported.exit_code == 0 and (tmp_path / "r.gguf").is_file(), exported.output
    assert "model card was not updated" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_verify_compares_the_file_in_llama_cpp_with_the_merged_model(quant, copy_run, tmp_path):
    pytest.importorskip("llama_cpp")
    target = tmp_path / f"verified-{quant}.gguf"
    result = invoke("export", copy_run / "run", "--quant", quant, "--output", target, "--verify")
    assert result.exit_code == 0, result.output
    assert f"llama.cpp parity ({quant}): tokenization" in result.output
    if quant == "f16":
        assert "greedy continuations" in result.output and "/8 identical" in result.output


@pytest.mark.slow
def test_verify_fails_a_broken_file(copy_run, tmp_path, monkeypatch):
    """A file with one tensor's rows permuted (each block's MLP output projection): exit 4, the file kept."""
    pytest.importorskip("llama_cpp")
    from finetune.outputs.gguf import architectures

    converted = architectures._converted

    def permuted(arch, hf_name, data, n_head, n_kv):
        data = converted(arch, hf_name, data, n_head, n_kv)
        return data.flip(0) if hf_name.endswith("mlp.down_proj.weight") else data

    monkeypatch.setattr(architectures, "_converted", permuted)
    target = tmp_path / "broken.gguf"
    result = invoke("export", copy_run / "run", "--output", target, "--verify")
    assert result.exit_code == 4, result.output
    assert "differs from the merged model in llama.cpp" in result.output and "greedy continuations" in result.output
    assert target.exists()


def test_a_gguf_base_loads_with_a_read_only_cache(copy_run, tmp_path, monkeypatch, caplog):
    """A cache that cannot be written (a read-only home, FINETUNE_CACHE naming a file) stopped a GGUF base from
    loading: "cannot write ...: write somewhere writable (output.dir, --output)", which was not the place at fault.
    The conversion is made for the command alone, with a warning naming the cache."""
    from finetune.models.references import dequantised_gguf

    target = tmp_path / "m.gguf"
    assert invoke("export", copy_run / "run", "--format", "gguf", "--output", target).exit_code == 0
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache would be\n")
    monkeypatch.setenv("FINETUNE_CACHE", str(blocked))
    with caplog.at_level("WARNING", logger="finetune"):
        converted = dequantised_gguf(str(tmp_path), "m.gguf")
    assert (converted / "config.json").is_file() and not str(converted).startswith(str(blocked))
    assert "is not writable" in caplog.text and "FINETUNE_CACHE" in caplog.text
    assert blocked.read_text() == "a file where the cache would be\n"
