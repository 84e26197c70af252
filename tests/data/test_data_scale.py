"""The columnar data path: one-pass truncation equals the tokenizer's own, the feature cache is reused, verified
and rebuilt, workers give the same features as one process, and bad files are still named exactly."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from conftest import classification_recipe, corpus, write_jsonl
from transformers import AutoTokenizer
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import tables as data
from finetune.data.cache import FeatureCache
from finetune.data.tables import load_table
from finetune.errors import DataError
from finetune.flows.resolve import resolve
from finetune.flows.session import open_data
from finetune.tasks.classification import Truncation

runner = CliRunner()

TEXTS = [
    "short",
    "",
    "a much longer text " * 20,
    "héllo wörld\nnew line  spaces",
    "<s> looks special </s>",
    "match goal team player coach league score season win stadium " * 3,
]


@pytest.mark.parametrize("kind", ["bert", "bart", "gpt2", "llama"])
@pytest.mark.parametrize("max_length", [4, 16, 64])
@pytest.mark.parametrize("side", ["right", "left"])
def test_one_pass_truncation_equals_the_tokenizers(kind, max_length, side, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[kind])
    tokenizer.truncation_side = side
    truncate = Truncation(tokenizer, max_length)
    assert truncate.backend is not None  # the fast path is the one under test
    encoded, lengths = truncate(TEXTS)
    assert encoded == dict(tokenizer(TEXTS, truncation=True, max_length=max_length))
    assert lengths == [len(ids) for ids in tokenizer(TEXTS, truncation=False)["input_ids"]]
    assert any(n > max_length for n in lengths)
    pairs = list(reversed(TEXTS))
    encoded, lengths = truncate(TEXTS, pairs)
    assert encoded == dict(tokenizer(TEXTS, pairs, truncation=True, max_length=max_length))
    assert lengths == [len(ids) for ids in tokenizer(TEXTS, pairs, truncation=False)["input_ids"]]


def _features(recipe_path):
    session = open_data(resolve(recipe_path, []))
    return session, {split: (f.dataset.to_list(), f.rows.to_list()) for split, f in session.features.items()}


def test_feature_cache_is_reused_verified_and_rebuilt(tiny_models, topic_data, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    path = write_recipe(classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run"))
    first, built = _features(path)
    assert first.cache_note.startswith("tokenised features cached (entry")
    second, reused = _features(path)
    assert second.cache_note.startswith("reused tokenised features") and reused == built
    assert second.state == first.state and dict(second.overlap) == dict(first.overlap)

    entry = FeatureCache(None).root / second.cache_note.removesuffix(")").split()[-1]
    damaged = next(entry.glob("train-features*.arrow"))
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF  # one flipped byte in the token ids: still a readable Arrow file
    damaged.write_bytes(bytes(content))
    third, rebuilt = _features(path)
    assert "damaged" in third.cache_note and rebuilt == built
    fourth, _ = _features(path)
    assert fourth.cache_note.startswith("reused")  # the rebuilt entry was published again

    # A setting that shapes features is part of the key: a new entry, never the old one.
    recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / "run")
    recipe["data"]["max_length"] = 8
    other, _ = _features(write_recipe(recipe, "short.yaml"))
    assert other.cache_note.startswith("tokenised features cached (entry")

    # So is the code that reads and featurises rows: a fix there (with the version unchanged) misses the cache, or
    # the old features were served and the new row checks skipped.
    from finetune.data import cache

    monkeypatch.setattr(cache, "reading_code_hash", lambda: "changed code")
    changed, _ = _features(path)
    assert changed.cache_note.startswith("tokenised features cached (entry")


def test_rows_left_out_from_the_start_stay_left_out_through_the_cache(tiny_models, tmp_path, write_recipe, monkeypatch):
    """Rows kept by a contiguous selection (the first training row dropped as over-long) are a slice of the rows'
    file, not an index mapping: the cache wrote the whole file back, so features and rows no longer lined up
    (GRPO scores a sample against its row by index; `data --tokens` lost every row number)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    rows = corpus(40)
    training = [{**rows[0], "text": "word " * 200}, *rows[1:30]]  # only the first is too long
    data = {
        "train": write_jsonl(tmp_path / "data" / "train.jsonl", training),
        "eval": write_jsonl(tmp_path / "data" / "eval.jsonl", rows[30:]),
    }
    recipe = classification_recipe(tiny_models["bert"], data, tmp_path / "run")
    recipe["data"]["overflow"] = "drop"
    path = write_recipe(recipe)
    for _ in ("built", "reused"):
        session, features = _features(path)
        inputs, kept = features["train"]
        assert len(inputs) == len(kept) == len(training) - 1
        assert [row["text"] for row in kept] == [row["text"] for row in training[1:]]


def test_cached_run_trains_the_same_adapter_bytes(tiny_models, topic_data, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    adapters = []
    for name in ("cold", "warm"):
        recipe = classification_recipe(tiny_models["bert"], topic_data, tmp_path / name, epochs=1)
        result = runner.invoke(app, ["run", str(write_recipe(recipe, f"{name}.yaml"))])
        assert result.exit_code == 0, result.output
        adapters.append((tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes())
    assert "reused tokenised features" in result.output
    assert adapters[0] == adapters[1]


def test_workers_give_the_same_features_as_one_process(tiny_models, tmp_path, write_recipe, monkeypatch):
    monkeypatch.setattr(data, "PARALLEL_MIN_ROWS", 10)  # tiny data, real worker processes
    rows = corpus(400)
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:300]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[300:]),
    }
    results = []
    for workers in (1, 2):
        monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / f"cache-{workers}"))
        recipe = classification_recipe(tiny_models["bert"], files, tmp_path / "run")
        recipe["data"]["num_workers"] = workers
        results.append(_features(write_recipe(recipe, f"w{workers}.yaml"))[1])
    assert results[0] == results[1]


def test_a_bad_row_in_a_worker_is_still_named(tiny_models, tmp_path, write_recipe, monkeypatch):
    monkeypatch.setattr(data, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))  # its own: other tests build in the shared one
    rows = [{**row, "text_pair": "and more"} for row in corpus(200)]
    rows[150]["text_pair"] = None  # an optional field: the task finds it, in a worker, and the file's line is named
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:20] + rows[100:]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", rows[20:40]),
    }
    recipe = classification_recipe(tiny_models["bert"], files, tmp_path / "run")
    recipe["data"]["num_workers"] = 2
    result = runner.invoke(app, ["run", str(write_recipe(recipe)), "--dry-run"])
    assert result.exit_code == 3, result.output
    assert "train.jsonl:71: field 'text_pair' must be text, got no value (missing or null)" in result.output
    features = FeatureCache(None).root
    assert not [p for p in features.glob(".*") if p.is_dir()]  # the failed build's work directory is gone


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 2}\n', r"d.jsonl:2: not UTF-8 text"),
        (b'{"text": "a", "label": 1}\n\n{"text": "b" "label": 2}\n', r"d.jsonl:3: malformed JSON line"),
        (b'{"text": "a", "label": 1}\n[1, 2]\n', r"d.jsonl:2: each line must be a JSON object, got list"),
        # A line cut short: the place is where it ends, not column 1 of a line after it.
        (
            b'{"text": "a", "label": 1}\n{"text": "b", "label": \n',
            r"d.jsonl:2: malformed JSON line \(Expecting value at column 24\)",
        ),
        (
            b'{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n',
            r"column 'label' is a number on line 1 but text on line 2",
        ),
    ],
)
def test_bad_jsonl_is_named_by_line(content, message, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_table(str(path), "data.train")
    zipped = tmp_path / "d.jsonl.gz"
    zipped.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match=message.replace("d.jsonl", "d.jsonl.gz")):
        load_table(str(zipped), "data.train")


def test_jsonl_through_arrow_keeps_types_and_long_rows(tmp_path):
    rows = [{"text": "x" * 5_000_000, "label": 1, "meta": {"a": [1, 2]}}, {"text": "y", "label": 2, "meta": None}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = load_table(str(path), "data.train")
    assert table.to_list() == rows
    with pytest.raises(DataError, match="not a readable gzip file"):
        (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
        load_table(str(tmp_path / "broken.jsonl.gz"), "data.train")


@pytest.mark.parametrize("max_length, stride", [(24, 4), (32, 12), (64, 20)])
def test_qa_lengths_come_from_the_windows_exactly(max_length, stride, tiny_models):
    from finetune.tasks import qa_spans

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    context = " ".join(corpus(40)[i]["text"] for i in range(40))
    for words in (3, 10, 40, 120, 400):
        question, text = "which team won the match", " ".join(context.split()[:words])
        report = qa_spans.windows([question], [text], tokenizer, max_length, stride, "data.train").report
        whole = len(tokenizer(question, text, truncation=False)["input_ids"])  # one example: max is its length
        assert report.percentiles["max"] == whole and report.truncated == int(whole > max_length)


def test_builds_of_dead_processes_are_removed_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    """A build killed (kill -9) or failed (a full disk, a bad row) left its hidden work directory in the cache for
    good, as large as the features; a live build (another process, container or host) is never touched."""
    from finetune.data import cache

    root = tmp_path / "cache"
    features = root / "features"
    features.mkdir(parents=True)
    abandoned, alive = features / ".key1.abc", features / ".key2.def"
    for folder in (abandoned, alive):
        folder.mkdir()
        (folder / "train-rows.arrow").write_bytes(b"x")
    (features / f".key1.abc{cache._BUILDING}").touch()  # its builder died: nobody holds the lock
    held = cache._hold(features / f".key2.def{cache._BUILDING}")  # a live builder holds it
    try:
        built = FeatureCache("key3", root)
        workdir = built.workdir()
        assert not abandoned.exists() and alive.exists()
        assert (features / f"{workdir.name}{cache._BUILDING}").exists()
        built.discard(workdir)
        assert not workdir.exists() and not (features / f"{workdir.name}{cache._BUILDING}").exists()
    finally:
        os.close(held)


def test_a_worker_forked_for_featurising_dies_with_its_parent(monkeypatch):
    """kill -9 of a run featurising in worker processes left its pool and manager alive (~400 MB each), for good."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    monkeypatch.setattr(data, "_WORKERS_PARENT", os.getpid())
    child = os.fork()
    if child == 0:  # the hook has run: is this process set to die with its parent?
        found = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(found))  # PR_GET_PDEATHSIG
        os._exit(0 if found.value == signal.SIGKILL and data._WORKERS_PARENT is None else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _slow_lengths(batch: dict, indices: list[int]) -> dict:
    import time

    time.sleep(0.2)
    return {"n": [len(text) for text in batch["text"]], "row": indices}


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stop_while_workers_featurise_kills_them_and_raises_the_interrupt(tmp_path, monkeypatch, stop):
    """Ctrl-C or SIGTERM while `datasets`' pool featurised: the command hung in the pool's clean-up, or ended in an
    internal error (a TimeoutError over the interrupt). Now the interrupt itself (the command's 130 or 143), the
    workers gone, none of their shard files left."""
    import signal
    import threading
    import time

    from datasets import Dataset

    from finetune.cli import _terminate_as_interrupt

    monkeypatch.setattr(data, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(data, "MAP_BATCH_ROWS", 10)
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(400)]})  # 40 batches of 0.2 s: 4 s in 2 workers
    timer = threading.Timer(1.0, os.kill, (os.getpid(), getattr(signal, stop)))
    started = time.monotonic()
    # Python's own Ctrl-C handler, as a command has it (a test runner's worker process may ignore SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _terminate_as_interrupt(), pytest.raises(KeyboardInterrupt):  # SIGTERM: the command's KeyboardInterrupt
            timer.start()
            data.map_batches(rows, _slow_lengths, 2, "stop-test", "slow", output=tmp_path / "features.arrow")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 3.5
    import psutil

    assert not psutil.Process().children(), "a worker outlived the stop"
    # (datasets' own temporary files stay in the folder: the feature cache removes a failed build's folder whole)
    assert not list(tmp_path.glob("features*"))


def test_a_killed_worker_is_named_with_the_shells_exit_code(tmp_path, monkeypatch):
    """A featurising worker killed (the out-of-memory killer's SIGKILL) ends the command with 137, naming it."""
    import signal
    import threading

    import psutil
    from datasets import Dataset

    from finetune.errors import WorkerKilled

    monkeypatch.setattr(data, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(data, "MAP_BATCH_ROWS", 10)
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(400)]})

    def kill_one() -> None:
        for child in psutil.Process().children():
            child.send_signal(signal.SIGKILL)
            return

    threading.Timer(1.0, kill_one).start()
    with pytest.raises(WorkerKilled, match="killed by SIGKILL") as raised:
        data.map_batches(rows, _slow_lengths, 2, "kill-test", "slow", output=tmp_path / "features.arrow")
    assert raised.value.exit_code == 137 and not list(tmp_path.glob("features*"))


def test_workers_number_rows_from_the_start_of_the_whole_table(tmp_path, monkeypatch):
    from datasets import Dataset

    monkeypatch.setattr(data, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(data, "MAP_BATCH_ROWS", 7)
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(101)]})
    mapped = data.map_batches(rows, lambda b, i: {"row": i}, 3, "rows-test", "rows")  # in memory
    assert mapped["row"] == list(range(101)) and len(mapped.cache_files) == 0


def _long_error(batch: dict, indices: list[int]) -> dict:
    if indices[0] >= 200:
        raise DataError(f"row {indices[0] + 1}: " + "x" * 200_000)  # more than a pipe holds
    return {"n": [len(text) for text in batch["text"]]}


def test_a_workers_long_error_comes_back_at_once(tmp_path, monkeypatch):
    """A worker's error larger than a pipe's buffer (a long row quoted) blocked it in send() while the parent waited
    for every worker to end first: the command hung."""
    import time

    from datasets import Dataset

    monkeypatch.setattr(data, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(data, "MAP_BATCH_ROWS", 10)
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(400)]})
    started = time.monotonic()
    with pytest.raises(DataError, match="row 201: x"):
        data.map_batches(rows, _long_error, 2, "long-error", "long", output=tmp_path / "features.arrow")
    assert time.monotonic() - started < 30
