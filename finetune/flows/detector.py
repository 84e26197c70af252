"""SynthID's Bayesian detector (transformers' `BayesianDetectorModel`), trained for one run's model and key.

The mean-score z-test in `watermark.py` needs no training, but treats every g-value alike; the Bayesian detector
learns how this model's tournaments actually play out (Dathathri et al. 2024). It is trained on the run's own
generations: for its training prompts, samples with the watermark (label 1) and without (label 0), same
sampling settings, each text's g-values and mask computed exactly as detection computes them. Training follows
transformers' SynthID research example: Adam at 2.1e-2, a few L2 weights on the likelihood model's `delta`, the
one with the lowest validation loss kept. Its weights go to `RUN/watermark_detector/` (`save_pretrained`), with
`training.json` (samples, loss, and the held-out true- and false-positive rates at a 0.5 posterior). `detect`
reports its probability beside the z-test's verdict: measured on short sampled copy, its false-positive rate
was far from the z-test's (docs/watermarks.md).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BayesianDetectorConfig, BayesianDetectorModel, PreTrainedTokenizerBase

from finetune.files import replace_directory, write_json
from finetune.tasks.text2text import decode_batch_size, generate
from finetune.watermark.marking import generation_config, synthid_evidence

REPORT_FILE = "training.json"
VALIDATION_FRACTION = 0.3
EPOCHS = 50
LEARNING_RATE = 2.1e-2
L2_WEIGHTS = (1e-3, 2.2e-3, 4.6e-3, 1e-2)  # transformers' example: logspace(-3, -2, 4)
BATCH = 64


@dataclass
class Evidence:
    """Padded g-values (texts, positions, depth), masks (texts, positions) and labels (texts,)."""

    g_values: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def take(self, index: list[int]) -> Evidence:
        return Evidence(self.g_values[index], self.mask[index], self.labels[index])


def train_for_model(session, prompts: list[list[int]], accelerator) -> tuple[BayesianDetectorModel, dict]:
    """Generate from `prompts` (token ids) with and without the session's synthid watermark, then train on both."""
    recipe, tokenizer = session.recipe, session.tokenizer
    settings = recipe.eval.watermark
    texts = {}
    for label, generation in (
        ("marked", recipe.eval),
        ("unmarked", recipe.eval.model_copy(update={"watermark": None})),
    ):
        answers = generate(
            session.model,
            tokenizer,
            session.family,
            prompts,
            generation,
            session.task.answer_stops(generation, recipe.data, session.features["train"].rows),
            decode_batch_size(generation, recipe.eval_batch_size),
            accelerator,
        )
        texts[label] = [tokenizer(text, add_special_tokens=False)["input_ids"] for group in answers for text in group]
    processor = generation_config(settings).construct_processor(session.model.config.vocab_size, "cpu")
    data = evidence(processor, tokenizer, texts["marked"], texts["unmarked"])
    model, report = train_detector(data, settings.depth, recipe.train.seed)
    return model, {"prompts": len(prompts), **report}


def save(model: BayesianDetectorModel, report: dict, target: Path) -> None:
    """The weights and training.json, written beside `target` and renamed into place."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    write_json(staging / REPORT_FILE, report)
    replace_directory(staging, target, aside=target.with_name(target.name + ".old"))


def evidence(
    processor, tokenizer: PreTrainedTokenizerBase, marked: list[list[int]], unmarked: list[list[int]]
) -> Evidence:
    """Every text's g-values and mask, padded to the longest (padding is masked out)."""
    texts = [synthid_evidence(processor, tokenizer, ids) for ids in marked + unmarked]
    width, depth = max(1, max(len(g) for g, _ in texts)), len(processor.keys)
    g_values, mask = torch.zeros(len(texts), width, depth), torch.zeros(len(texts), width)
    for row, (g, keep) in enumerate(texts):
        g_values[row, : len(g)], mask[row, : len(keep)] = g.float(), keep.float()
    labels = torch.tensor([1.0] * len(marked) + [0.0] * len(unmarked))
    return Evidence(g_values, mask, labels)


def train_detector(data: Evidence, depth: int, seed: int) -> tuple[BayesianDetectorModel, dict]:
    """The detector with the lowest validation loss over the L2 weights, and what its training measured."""
    order = list(range(len(data.labels)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(order) * VALIDATION_FRACTION))
    validation, train = data.take(order[:cut]), data.take(order[cut:])
    best, best_loss, best_l2 = None, float("inf"), None
    for l2 in L2_WEIGHTS:
        torch.manual_seed(seed)
        model = BayesianDetectorModel(BayesianDetectorConfig(watermarking_depth=depth))
        loss = _fit(model, train, validation, l2)
        if loss < best_loss:
            best, best_loss, best_l2 = model, loss, l2
    assert best is not None, "L2_WEIGHTS is never empty"
    best.eval()
    with torch.no_grad():
        verdicts = best(validation.g_values, validation.mask)[0] > 0.5
    positives, negatives = validation.labels == 1, validation.labels == 0
    report = {
        "train_texts": len(train.labels),
        "validation_texts": len(validation.labels),
        "l2_weight": best_l2,
        "validation_loss": best_loss,
        "validation_true_positive_rate": _rate(verdicts[positives]),
        "validation_false_positive_rate": _rate(verdicts[negatives]),
        "validation_unmarked_texts": int(negatives.sum()),
    }
    return best, report


def _fit(model: BayesianDetectorModel, train: Evidence, validation: Evidence, l2: float) -> float:
    """Adam over shuffled batches for EPOCHS epochs; the weights of the epoch with the lowest validation loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    best_loss, best_state = float("inf"), None
    generator = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(train.labels), generator=generator).split(BATCH):
            _, loss = model(train.g_values[batch], train.mask[batch], labels=train.labels[batch], loss_batch_weight=l2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():  # the validation loss without the L2 term, as the example scores it
            _, loss = model(validation.g_values, validation.mask, labels=validation.labels, loss_batch_weight=0)
        if float(loss) < best_loss:
            best_loss, best_state = float(loss), {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None, "at least one epoch ran"
    model.load_state_dict(best_state)
    return best_loss


def _rate(verdicts: torch.Tensor) -> float | None:
    return float(verdicts.float().mean()) if verdicts.numel() else None
