"""Prompt -> completion machinery shared by the generation tasks (copywriting, codegen, generative QA).

Training features put the loss on completion tokens only: for GPT-style
models the prompt and padding positions carry label -100; for BART the prompt
is the encoder input and the completion (ending in EOS) the decoder target.
Generation is batched, left-padded for decoders, with the KV cache, and cut
at stop strings.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutput

from finetune.data.tables import LengthReport, apply_overflow
from finetune.errors import DataError, RecipeError
from finetune.evaluation.scoring import eval_loader
from finetune.models.families import FamilySpec
from finetune.recipe.schema import EvalSection, Recipe
from finetune.watermark import marking as watermark

if TYPE_CHECKING:
    from peft import PeftModel

IGNORE = -100

log = logging.getLogger("finetune")


def no_chat_template(model_name: str, key: str) -> str:
    """The refusal when prompts or conversations go through a chat template the tokenizer lacks (run and validate)."""
    fix = (
        "data.chat_template: false"
        if key == "data.chat_template"
        else "rows with the task's own fields (data.format: prompt)"
    )
    return (
        f"{key}: the tokenizer of {model_name} has no chat template, and it would render the prompts; use a chat "
        f"(instruct) checkpoint, or {fix}"
    )


def prompt_texts(prompts: list[str], tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> list[str]:
    """The prompts as the model sees them: raw, or as a user turn of the chat template."""
    if not recipe.data.chat_template:
        return prompts
    if not getattr(tokenizer, "chat_template", None):  # a recipe/model mismatch (exit 2), as for conversations
        raise RecipeError(no_chat_template(recipe.model.name_or_path, "data.chat_template"))
    return [
        # tokenize=False renders the conversation as text (transformers annotates every form it can return).
        cast(
            str,
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
        )
        for p in prompts
    ]


def _encode(texts: list[str], tokenizer: PreTrainedTokenizerBase, *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("model: the tokenizer has no EOS token, so completions cannot be terminated")
    return tokenizer.eos_token_id


@dataclass
class Encoded:
    """Token ids for prompts (and completions), after `data.overflow`."""

    prompt_ids: list[list[int]]
    features: Dataset | None  # input_ids / attention_mask / labels, when completions were given
    keep: np.ndarray  # indices of the input rows that survived overflow=drop
    report: LengthReport
    too_long: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows over max_length (truncated)


# A decoder's prompt keeps at least max_length // PROMPT_FLOOR tokens beside a completion too long for the width.
PROMPT_FLOOR = 4


def encode(
    prompts: list[str],
    completions: list[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    family: FamilySpec,
    recipe: Recipe,
    split: str,
) -> Encoded:
    """Tokenise prompt/completion pairs for training and evaluation loss, and prompts for generation.

    Over-long examples follow `data.overflow`. Truncation never drops a
    completion silently: a decoder keeps the end of the prompt next to the whole
    completion; only a completion too long to leave its prompt a quarter of the
    width (all of a shorter prompt) is cut, and those are counted in the report's notes.
    """
    text = prompt_texts(prompts, tokenizer, recipe)
    prompt_ids = _encode(text, tokenizer, special=not recipe.data.chat_template)
    completion_ids = None
    if completions is not None:
        eos = _eos_id(tokenizer)
        if family.encoder_decoder:
            completion_ids = [
                ids if ids and ids[-1] == eos else ids + [eos] for ids in _targets(completions, tokenizer)
            ]
        else:
            completion_ids = [ids + [eos] for ids in _encode(completions, tokenizer, special=False)]
    return fit(prompt_ids, completion_ids, tokenizer.bos_token_id, family, recipe, split)


def fit(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]] | None,
    bos: int | None,
    family: FamilySpec,
    recipe: Recipe,
    split: str,
) -> Encoded:
    """Tokenised prompts (and completions) within data.max_length, by data.overflow: `encode`'s rule, and that of
    a conversation's prompt turns and answer (`conversations.encode_turns`)."""
    max_length, policy = recipe.data.max_length, recipe.data.overflow
    if completion_ids is None:
        lengths = [len(p) for p in prompt_ids]
    elif family.encoder_decoder:
        lengths = [max(len(p), len(c)) for p, c in zip(prompt_ids, completion_ids)]
    else:
        lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    keep, report = apply_overflow(lengths, max_length, policy, split)
    too_long = report.truncated

    cut_completions = 0
    prompts_out, inputs, labels = [], [], []
    for i in keep:
        prompt = prompt_ids[i]
        if family.encoder_decoder:  # encoder input: cut the end, keep the closing EOS
            prompt = prompt if len(prompt) <= max_length else prompt[: max_length - 1] + prompt[-1:]
        # Generation sees the prompt alone, so it may use the whole max_length.
        prompts_out.append(prompt if family.encoder_decoder else _keep_end(prompt, max_length, bos))
        if completion_ids is None:
            continue
        completion = completion_ids[i]
        # A decoder's completion leaves its prompt a quarter of the width (all of a shorter prompt): a completion
        # filling max_length kept no prompt at all, and trained the answer to nothing. A quarter, not more: every
        # completion longer than the rest loses its end and EOS.
        room = max_length if family.encoder_decoder else max_length - min(len(prompt), max_length // PROMPT_FLOOR)
        if len(completion) > room:
            completion, cut_completions = completion[:room], cut_completions + 1
        if family.encoder_decoder:
            inputs.append(prompt)
            labels.append(completion)
        else:
            prompt = _keep_end(prompt, max_length - len(completion), bos)
            inputs.append(prompt + completion)
            labels.append([IGNORE] * len(prompt) + completion)
    if cut_completions:
        report.notes.append(
            f"{cut_completions} completion(s) were cut to fit max_length={max_length}"
            + (
                ""
                if family.encoder_decoder
                else " beside their prompt (which keeps a quarter of max_length, or all of a shorter one)"
            )
            + " (their end and EOS are not trained on); raise data.max_length or use data.overflow=drop"
        )
    if too_long and completion_ids is not None and not family.encoder_decoder:
        report.notes.append(f"{too_long} prompt(s) were shortened from the start to keep their completions")
    features = None
    if completion_ids is not None:
        features = Dataset.from_dict(
            {"input_ids": inputs, "attention_mask": [[1] * len(x) for x in inputs], "labels": labels}
        )
    too_long_rows = np.flatnonzero(np.asarray(lengths) > max_length) if report.truncated else np.zeros(0, np.int64)
    return Encoded(prompts_out, features, keep, report, too_long_rows)


def _targets(completions: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Decoder targets for encoder-decoder models, with the tokenizer's own special tokens (BART: <s> ... </s>)."""
    return tokenizer(text_target=completions)["input_ids"]


def _keep_end(ids: list[int], room: int, bos_id: int | None) -> list[int]:
    """The last `room` tokens, keeping a leading BOS when the start is cut."""
    if len(ids) <= room:
        return ids
    if room <= 0:
        return []
    if bos_id is not None and ids[0] == bos_id and room > 1:
        return ids[:1] + ids[len(ids) - room + 1 :]
    return ids[len(ids) - room :]


class PadCollator:
    """Pads input_ids/attention_mask with the pad id and labels with -100, on the right (training, loss)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": [r["input_ids"] + [self.pad_id] * (width - len(r["input_ids"])) for r in rows],
            "attention_mask": [r["attention_mask"] + [0] * (width - len(r["attention_mask"])) for r in rows],
        }
        if "labels" in rows[0]:
            label_width = max(len(r["labels"]) for r in rows)
            batch["labels"] = [r["labels"] + [IGNORE] * (label_width - len(r["labels"])) for r in rows]
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


class PackedCollator:
    """Concatenates a batch into one row with no padding at all (decoder models, training).

    Position ids restart at each sequence: transformers then builds a
    block-diagonal causal mask from them (SDPA/eager; flash attention reads them
    as sequence boundaries), so no token attends across sequences. The first
    label of each sequence is ignored, so none learns to predict the next one's
    start. The loss equals that of the padded batch (tests/tasks/test_packing.py).
    """

    def __call__(self, rows: list[dict]) -> dict:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for row in rows:
            input_ids += row["input_ids"]
            labels += [IGNORE] + row["labels"][1:]
            positions += range(len(row["input_ids"]))
        batch = {
            name: torch.tensor([values], dtype=torch.long)
            for name, values in (("input_ids", input_ids), ("labels", labels), ("position_ids", positions))
        }
        # Without a cache object the mask is derived from position ids (transformers' masking_utils).
        return {**batch, "use_cache": False}


@torch.no_grad()
def completion_loss(
    model: PeftModel | PreTrainedModel,
    features: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    family: FamilySpec,
    batch_size: int,
    accelerator: Accelerator,
) -> float | None:
    """Mean cross-entropy per completion token over the eval set (each example counted once across processes)."""
    if features is None or len(features) == 0:
        return None
    model.eval()
    inner = accelerator.unwrap_model(model)
    unwrap = getattr(inner, "get_base_model", None)
    base = unwrap() if unwrap is not None else inner
    # A decoder's logits only at the positions some row scores (its head, applied where it is asked to); the
    # prompt positions before them would be [rows x width x vocabulary] float32 logits that no loss reads.
    keeps = not family.encoder_decoder and "logits_to_keep" in inspect.signature(base.forward).parameters
    sums, counts = [], []
    for batch in eval_loader(features, PadCollator(tokenizer), batch_size, accelerator):
        labels = batch.pop("labels")
        if family.encoder_decoder:
            with accelerator.autocast():
                logits = model(**batch, labels=labels).logits
        else:  # a decoder predicts token t+1 at position t
            labels = labels[:, 1:]
            scored = (labels != IGNORE).any(0).nonzero().flatten()
            extra = {"logits_to_keep": scored} if keeps else {}
            with accelerator.autocast():
                logits = model(**batch, **extra).logits
            logits, labels = (logits, labels[:, scored]) if keeps else (logits[:, :-1], labels)
        mask = labels != IGNORE
        token_loss = scored_cross_entropy(logits, labels, mask)
        batch_sums, batch_counts = accelerator.gather_for_metrics(((token_loss * mask).sum(1), mask.sum(1)))
        sums.append(batch_sums.cpu())
        counts.append(batch_counts.cpu())
    total = torch.cat(counts).sum().item()
    return torch.cat(sums).sum().item() / total if total else None


# Scored positions whose float32 log-softmax is made at once in `scored_cross_entropy` (x the vocabulary).
LOSS_ROWS = 256


def scored_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [rows x width] (0 where `mask` is off) in float32, made only at the masked
    positions and `LOSS_ROWS` of them at a time: the same values as `cross_entropy(logits.float())` at those
    positions, without a float32 copy of the whole logits and a second one for the log-softmax."""
    chosen, targets = logits[mask], labels[mask]
    losses = chosen.new_empty(len(targets), dtype=torch.float32)
    for start in range(0, len(targets), LOSS_ROWS):
        stop = start + LOSS_ROWS
        losses[start:stop] = torch.nn.functional.cross_entropy(
            chosen[start:stop].float(), targets[start:stop], reduction="none"
        )
    return losses.new_zeros(mask.shape).masked_scatter(mask, losses)


class StopOnStrings(StoppingCriteria):
    """Per-sequence stop once the generated text contains any stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([stop_position(t, self.stops) is not None for t in texts], device=input_ids.device)


def stop_position(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts once the answer has begun (some text other than spaces before it), or
    None. A stop the answer opens with is not its end: codegen's "\ndef" cut an answer that starts on a new line
    by restating the signature ("\ndef f(x):\n    return ...") to nothing, scored as a failure."""
    begun = len(text) - len(text.lstrip()) + 1  # the first position with answer text before it
    positions = [at for at in (text.find(s, begun) for s in stops if s) if at >= 0]
    return min(positions) if positions else None


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text up to the first stop string after the answer began (`stop_position`; the stop itself excluded)."""
    at = stop_position(text, stops)
    return text if at is None else text[:at]


@torch.no_grad()
def generate(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    family: FamilySpec,
    prompt_ids: list[list[int]],
    settings: EvalSection,
    stops: list[str],
    batch_size: int | None,
    accelerator: Accelerator,
    end_ids: Sequence[int] = (),
) -> list[list[str]]:
    """`settings.num_samples` completions per prompt, cut at `stops`; prompts are sharded over processes.
    `end_ids`: tokens that end an answer besides EOS (a chat template's end-of-turn token). `batch_size`: rows
    decoded together (a prompt's samples count one each); None: as many as fit in memory
    (`generation_batch_size`): a decoding step reads every weight whatever the batch, so the fewer batches the
    faster (the SmolLM2 copywriting eval's 32 prompts, 2-core CPU, in one process: 13.9-16.4 s in 2 batches of
    16, 9.4-10.8 s in 1 of 32, the same text).

    Prompts are decoded longest first, so each batch holds prompts of similar length (little padding), and the
    answers come back in the prompts' order."""
    from accelerate.utils import gather_object

    model.eval()
    decoder = Decoder(accelerator.unwrap_model(model), tokenizer, family, settings, stops, end_ids, accelerator.device)
    n = settings.num_samples
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    with accelerator.split_between_processes(order) as mine, decoder.attention():
        from_memory = batch_size is None
        if batch_size is None:
            longest = max((len(prompt_ids[i]) for i in mine), default=0)
            batch_size = generation_batch_size(decoder.config, longest, settings, accelerator.device)
        log.info("generation: %s", batch_plan(batch_size, MEMORY_CHOICE if from_memory else "as asked", n))
        per_batch = max(1, batch_size // n)
        answers: list[tuple[int, list[str]]] = []
        for start in range(0, len(mine), per_batch):
            chunk = mine[start : start + per_batch]
            texts = decoder([prompt_ids[i] for i in chunk])
            answers.extend((index, texts[j * n : (j + 1) * n]) for j, index in enumerate(chunk))
    if accelerator.num_processes > 1:
        answers = gather_object(answers)
    by_index = dict(answers)
    return [by_index[i] for i in range(len(prompt_ids))]


# Share of the free memory one generation batch may take: the rest stays for the evaluation around it (the eval
# loss, scoring) and for whatever else runs on the machine; the estimate below is rough, this is its margin.
MEMORY_SHARE = 0.25


def generation_batch_size(config: PretrainedConfig, longest_prompt: int, settings: EvalSection, device: Any) -> int:
    """How many rows (prompts x samples) to decode together: as many as fit in a share of the device's free memory.

    A row holds its key/value cache for the prompt and every new token, and while the prompt is read, its
    activations (hidden states, the MLP, attention scores) and a row of logits; all in float32.
    """
    budget = free_memory(torch.device(device))
    row = row_bytes(config, longest_prompt, settings.max_new_tokens)
    return max(1, int(budget * MEMORY_SHARE // row))


def decode_batch_size(settings: EvalSection, fixed: int) -> int | None:
    """The `batch_size` to give `generate`: the recipe's eval.batch_size when set; else, for greedy decoding, None
    (as many rows as fit in memory: the fewer batches the faster, the same text whatever the batch); for sampled
    decoding `fixed` (the recipe's eval batch), because sampled tokens come from one generator over the whole
    batch, so a batch size that followed the free memory would give the same seed other answers run to run."""
    if settings.batch_size is not None:
        return settings.batch_size
    return None if settings.temperature == 0 else fixed


def free_memory(place: torch.device) -> int:
    """Bytes this process may take on `place`: a GPU's own free memory; on the CPU, the memory available to the
    machine or, inside a container, to its cgroup (psutil reads the host's /proc/meminfo), shared by the
    processes of this node (LOCAL_WORLD_SIZE, set by the launcher), which all decode at the same time."""
    if place.type == "cuda":
        return int(torch.cuda.mem_get_info(place)[0])
    import psutil

    available = int(psutil.virtual_memory().available)
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit, usage = (Path(f).read_text().strip() for f in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            available = min(available, max(0, int(limit) - int(usage)))
        break
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


MEMORY_CHOICE = f"as many as fit in {MEMORY_SHARE:.0%} of the free memory"


def batch_plan(rows: int, how: str, samples: int = 1) -> str:
    """How generation batches its rows (`how`: who chose their number), as the plan and the log say it. A prompt's
    `samples` are decoded together, so a batch holds whole prompts: at least `samples` rows."""
    decoded = max(1, rows // samples) * samples
    said = (
        f"{rows} rows per batch"
        if decoded == rows
        else f"{decoded} rows per batch ({rows} asked; a prompt's {samples} samples stay together)"
    )
    return f"{said} ({how}); prompts grouped by length, each row leaving the batch at its end"


def row_bytes(config: PretrainedConfig, prompt: int, new_tokens: int) -> int:
    """Peak bytes one generated row needs in float32 (see `generation_batch_size`)."""
    text = config.get_text_config()
    hidden = text.hidden_size
    heads = getattr(text, "decoder_attention_heads", None) or text.num_attention_heads
    layers = getattr(text, "decoder_layers", None) or text.num_hidden_layers
    kv_width = (getattr(text, "num_key_value_heads", None) or heads) * (
        getattr(text, "head_dim", None) or hidden // heads
    )
    # The MLP's width has a name per architecture (Llama, GPT-2, BART); 4 x hidden is GPT-2's default.
    mlp = next(
        (w for w in (getattr(text, k, None) for k in ("intermediate_size", "n_inner", "decoder_ffn_dim")) if w),
        4 * hidden,
    )
    positions = prompt + new_tokens
    cache = 2 * layers * kv_width * positions  # keys and values; an encoder-decoder's cross-attention too
    reading = prompt * (4 * hidden + 2 * mlp + heads * prompt)  # one layer's activations at a time
    return 4 * (cache + reading + 2 * text.vocab_size)


class Decoder:
    """Batched decoding with the key/value cache, greedy or sampled, each row ending at its own end token.

    Decoder prompts are padded on the left (every row continues from its own last token, with positions counted
    from its first real token), encoder inputs on the right. Decoding runs in the weights' own precision
    (float32 as finetune loads them; no autocast), so greedy answers are those of float32 decoding one prompt at a
    time. A row that ends (an end token, or a stop string in its text) leaves the batch and its cache, so the
    others no longer carry it; only a watermark that keeps per-row state keeps it in place to the end. The
    recipe's settings alone choose tokens (temperature, top-p, the watermark), never a checkpoint's own
    generation defaults (beams, top-k, repetition penalties).

    The cache is transformers' dynamic one: its preallocated `StaticCache` did not pay off on this torch (2.13,
    CPU): the SmolLM2 copywriting eval's 32 prompts decoded in 12.2 s with it against 12.1 s without, in one
    process, as it attends over every preallocated position and cannot drop the rows that ended."""

    def __init__(
        self,
        model: PeftModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        family: FamilySpec,
        settings: EvalSection,
        stops: list[str],
        end_ids: Sequence[int],
        device: torch.device,
    ):
        self.model, self.tokenizer, self.settings, self.device = model, tokenizer, settings, device
        self.encoder_decoder = family.encoder_decoder
        # The transformers model under a peft wrapper: its config, and the arguments its forward takes.
        unwrap = getattr(model, "get_base_model", None)
        base = cast(PreTrainedModel, unwrap() if unwrap is not None else model)
        self.base, self.config = base, base.config
        eos = _eos_id(tokenizer)
        self.pad_id = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self.ends = torch.tensor(list(dict.fromkeys([eos, *end_ids])), device=device)
        self.stop = StopOnStrings(tokenizer, stops, 0) if stops else None
        takes = inspect.signature(base.forward).parameters
        # Logits for the last prompt position only, where the model can (a [rows x prompt x vocab] tensor otherwise).
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        # transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning).
        self.cache_name = "cache" if "cache" in takes else "past_key_values"

    @contextlib.contextmanager
    def attention(self) -> Iterator[None]:
        """transformers' SDPA attention while decoding, where the session chose eager attention (for the backward
        pass of bf16 training on CPUs, flows/session.py): decoding has no backward, and in float32 SDPA decoded the
        SmolLM2 copywriting eval in 8.4 s against eager's 13.9 s (32 prompts in one batch, 2-core CPU)."""
        chosen = self.config._attn_implementation
        if chosen != "eager":
            yield
            return
        try:
            self.base.set_attn_implementation("sdpa")
        except (ValueError, ImportError):  # an architecture without SDPA keeps eager
            yield
            return
        try:
            yield
        finally:
            self.base.set_attn_implementation(chosen)

    def processors(self) -> LogitsProcessorList:
        """transformers' processors in `generate`'s order: marking on raw logits, temperature, top-p, marking last.
        New for each batch (SynthID keeps per-row state)."""
        settings = self.settings
        raw, final = watermark.logits_processors(
            settings.watermark, self.config.get_text_config().vocab_size, self.device
        )
        warpers: list[LogitsProcessor] = []
        if settings.temperature > 0:
            if settings.temperature != 1:
                warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1:
                warpers.append(TopPLogitsWarper(settings.top_p))
        return LogitsProcessorList([*raw, *warpers, *final])

    def __call__(self, prompts: list[list[int]]) -> list[str]:
        """`num_samples` answers per prompt, in order (a prompt's samples side by side), cut at the stop strings."""
        ids = self._decode(prompts)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [cut_at_stops(t, self.stop.stops if self.stop else []) for t in texts]

    def _decode(self, prompts: list[list[int]]) -> list[list[int]]:
        """The new token ids of every row (its end token included, as `generate` returns them)."""
        settings, device = self.settings, self.device
        samples = settings.num_samples
        width = max(1, max(len(p) for p in prompts))
        pads = [width - len(p) for p in prompts]
        if self.encoder_decoder:
            ids = torch.tensor([[*p, *[self.pad_id] * k] for p, k in zip(prompts, pads)], device=device)
            mask = torch.tensor([[1] * len(p) + [0] * k for p, k in zip(prompts, pads)], device=device)
            encoder = self.model.get_encoder()(input_ids=ids, attention_mask=mask)
            hidden = encoder.last_hidden_state.repeat_interleave(samples, 0)
            mask = mask.repeat_interleave(samples, 0)
            context = torch.full((len(hidden), 1), self.config.decoder_start_token_id, device=device)
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                attention_mask=mask,
                decoder_input_ids=context,
                use_cache=True,
            )
            cache, logits = getattr(out, self.cache_name), out.logits[:, -1]
        else:
            ids = torch.tensor([[*[self.pad_id] * k, *p] for p, k in zip(prompts, pads)], device=device)
            mask = torch.tensor([[0] * k + [1] * len(p) for p, k in zip(prompts, pads)], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **self.last_logits
            )
            cache, logits = getattr(out, self.cache_name), out.logits[:, -1]
            if samples > 1:  # the prompt is read once; its samples share its cache from here
                cache.batch_repeat_interleave(samples)
                logits = logits.repeat_interleave(samples, 0)
            context = ids.repeat_interleave(samples, 0)
            mask = mask.repeat_interleave(samples, 0)
            position = positions[:, -1].repeat_interleave(samples, 0)

        processors = self.processors()
        compact = not watermark.keeps_row_state(settings.watermark)
        rows = len(context)
        row_of = torch.arange(rows, device=device)  # the answer each batch row writes
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        new = context[:, :0]
        answers: list[list[int]] = [[] for _ in range(rows)]
        for step in range(settings.max_new_tokens):
            scores = processors(cast(torch.LongTensor, context), logits)
            if settings.temperature > 0:
                token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
            else:
                token = scores.argmax(-1)
            context = torch.cat([context, token[:, None]], 1)
            new = torch.cat([new, token[:, None]], 1)
            ended = torch.isin(token, self.ends)
            if self.stop is not None:
                ended |= self.stop(new, scores)
            for r in (ended & ~done).nonzero().flatten().tolist():
                answers[int(row_of[r])] = new[r].tolist()
            done |= ended
            if bool(done.all()) or step == settings.max_new_tokens - 1:
                break
            if compact and bool(done.any()):  # finished rows leave the batch, its cache and its inputs
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                context, new, token, row_of, done, mask = (t[keep] for t in (context, new, token, row_of, done, mask))
                if self.encoder_decoder:
                    hidden = hidden[keep]
                else:
                    position = position[keep]
            if self.encoder_decoder:
                out = self.model(
                    encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                    attention_mask=mask,
                    decoder_input_ids=token[:, None],
                    use_cache=True,
                    **{self.cache_name: cache},
                )
            else:
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
                position = position + 1
                out = self.model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=position[:, None],
                    use_cache=True,
                    **{self.cache_name: cache},
                )
            logits = out.logits[:, -1]
        for r in (~done).nonzero().flatten().tolist():  # rows that ran to max_new_tokens
            answers[int(row_of[r])] = new[r].tolist()
        return answers


class CompletionEntropy:
    """The model's next-token entropy (nats) before each token of a completion, given its prompt as generation
    encodes it: what an entropy-gated watermark saw when it chose which tokens to mark."""

    def __init__(
        self,
        model: PeftModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        family: FamilySpec,
        recipe: Recipe,
        accelerator: Accelerator,
    ):
        self.model, self.tokenizer, self.family, self.accelerator = model, tokenizer, family, accelerator
        # Generation never drops a prompt (predict truncates too): neither does scoring.
        self.recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"overflow": "truncate"})})

    @torch.no_grad()
    def __call__(self, prompt: str, ids: list[int]) -> torch.Tensor:
        prompt_ids = encode([prompt], None, self.tokenizer, self.family, self.recipe, "watermark detection").prompt_ids[
            0
        ]
        if not prompt_ids:  # a decoder needs one position to predict the first token from
            prompt_ids = [
                _eos_id(self.tokenizer) if self.tokenizer.bos_token_id is None else self.tokenizer.bos_token_id
            ]
        # The sequence the (decoder of the) model reads, and where the text starts in it; logit t predicts token t + 1.
        if self.family.encoder_decoder:
            sequence, first = [self.model.config.decoder_start_token_id] + ids, 1
        else:
            sequence, first = prompt_ids + ids, len(prompt_ids)
        # A text longer than the model's positions (a long human document) is read in stretches of half of them,
        # each with as much of what precedes it as fits: an approximation of its entropies, never an error.
        limit = getattr(self.model.config, "max_position_embeddings", None) or len(sequence)
        step = len(sequence) if len(sequence) <= limit else max(1, limit // 2)
        self.model.eval()
        parts = []
        for begin in range(first, len(sequence), step):
            end = min(begin + step, len(sequence))
            low = max(0, end - limit)
            logits = self._logits(prompt_ids, sequence[low:end])
            parts.append(watermark.entropy(logits[begin - 1 - low : end - 1 - low]).cpu())
        return torch.cat(parts) if parts else torch.zeros(0)

    def _logits(self, prompt_ids: list[int], window: list[int]) -> torch.Tensor:
        device = self.accelerator.device
        with self.accelerator.autocast():
            if self.family.encoder_decoder:
                return self.model(
                    input_ids=torch.tensor([prompt_ids], device=device),
                    decoder_input_ids=torch.tensor([window], device=device),
                ).logits[0]
            return self.model(input_ids=torch.tensor([window], device=device)).logits[0]
