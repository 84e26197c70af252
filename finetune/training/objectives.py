"""Training objectives: what the loop minimises for one batch (`train.objective`).

sft is the model's own cross-entropy on the reference completion. The preference objectives score whole
completions by their summed token log-probabilities (DPO, KTO) or their mean (ORPO) under the policy, and, for
DPO and KTO, under the reference policy: the starting point of training (the base model with fresh LoRA, or
the adapter named by `model.adapter`), whose log-probabilities are computed once before training
(`reference_logps`) so no second copy of the model is ever held. Each loss equals TRL's implementation of the
same name on the same batch (tests/training/test_preference.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset

from finetune.evaluation.scoring import eval_loader
from finetune.recipe.schema import GRPOSection, PreferenceSection
from finetune.tasks.preference import PAIR_SIDES, sides_of

IGNORE = -100


def sequence_logps(
    model: torch.nn.Module, input_ids, attention_mask, labels, encoder_decoder: bool, average: bool = False
) -> torch.Tensor:
    """Each sequence's summed (or mean) log-probability of its label tokens (labels -100 are not scored).

    A decoder predicts token t+1 at position t; an encoder-decoder's logits are aligned with its labels.
    """
    if encoder_decoder:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).logits
    else:
        logits, labels = decoder_logits(model, input_ids, attention_mask, labels)
    per_token, mask = label_logps(logits, labels)
    total = (per_token * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label token's log-probability under aligned `logits` (0 where the label is -100), and the label mask.

    log_softmax at the label only: gather minus logsumexp, never a second vocabulary-sized tensor of logps.
    """
    mask = labels != IGNORE
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)
    logits = logits.float()
    per_token = torch.gather(logits, -1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return per_token * mask, mask


def decoder_logits(model: torch.nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder's logits for the positions that predict a label token, with those labels (aligned).

    Only the positions from the batch's earliest label on are projected onto the vocabulary (transformers'
    `logits_to_keep`): the prompt's logits, a vocabulary-sized row per prompt token, are never made. Same
    numbers as slicing the full logits, a fraction of the memory.
    """
    width = input_ids.shape[1]
    first = int((labels != IGNORE).int().argmax(-1).min()) if bool((labels != IGNORE).any()) else width - 1
    keep = width - max(first, 1) + 1  # positions first-1 .. width-1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    return logits[:, :-1], labels[:, width - keep + 1 :]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -ln 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class Step:
    """One batch's loss and, for preference objectives, what each row's implicit reward says."""

    loss: torch.Tensor
    rows: dict[str, torch.Tensor]  # per row, detached: chosen_reward / rejected_reward / ... (empty for sft)
    stats: dict[str, float] = field(default_factory=dict)  # logged with the step (train_log.jsonl), batch means
    tokens: torch.Tensor | None = None  # tokens trained on, when the batch does not show them (GRPO's samples)


class Objective:
    name = "sft"
    needs_reference = False

    def __init__(self, settings: PreferenceSection, encoder_decoder: bool):
        self.settings, self.encoder_decoder = settings, encoder_decoder

    def step(self, model: torch.nn.Module, batch: dict) -> Step:
        return Step(model(**batch).loss, {})

    def parts(self, batch: dict) -> list[tuple[dict, float]]:
        """The batch as the loop runs it: parts, each with its weight in the batch's mean loss."""
        return [(batch, 1.0)]

    def logps(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], self.encoder_decoder)


def pair_halves(batch: dict, encoder_decoder: bool) -> list[tuple[dict, float]]:
    """A batch of B pairs (2B sequences: chosen, then rejected) as two batches of about B/2 pairs, weighted by
    their share of the pairs. Each pair's loss depends on that pair alone, so the halves' weighted gradients sum
    to the whole batch's, while the activations held at once are those of B sequences: an SFT batch's."""
    pairs = batch["input_ids"].shape[0] // 2
    if pairs < 2:
        return [(batch, 1.0)]
    middle = (pairs + 1) // 2
    out = []
    for start, stop in ((0, middle), (middle, pairs)):
        rows = torch.cat([torch.arange(start, stop), torch.arange(pairs + start, pairs + stop)])
        part = {}
        for name, value in batch.items():
            if not isinstance(value, torch.Tensor):
                part[name] = value
            elif value.shape[0] == 2 * pairs:  # the sequences
                part[name] = value[rows.to(value.device)]
            else:  # per pair (reference log-probabilities)
                part[name] = value[start:stop]
        if not encoder_decoder:  # a decoder's rows (right-padded): drop the half's padding columns
            width = int(part["attention_mask"].sum(-1).max())
            for name in ("input_ids", "attention_mask", "labels"):
                part[name] = part[name][:, :width].contiguous()
        out.append((part, (stop - start) / pairs))
    return out


class DPO(Objective):
    name = "dpo"
    needs_reference = True

    def parts(self, batch: dict) -> list[tuple[dict, float]]:
        return pair_halves(batch, self.encoder_decoder)

    def step(self, model: torch.nn.Module, batch: dict) -> Step:
        s = self.settings
        chosen, rejected = self.logps(model, batch).chunk(2)
        chosen_ratio = chosen - batch["ref_chosen_logps"].to(chosen.dtype)
        rejected_ratio = rejected - batch["ref_rejected_logps"].to(rejected.dtype)
        delta = chosen_ratio - rejected_ratio
        if s.loss == "sigmoid":
            losses = -F.logsigmoid(s.beta * delta)
        elif s.loss == "hinge":
            losses = torch.relu(1 - s.beta * delta)
        elif s.loss == "ipo":  # per completion token, as TRL (and the IPO authors) normalise it
            chosen_n, rejected_n = (batch["labels"] != IGNORE).sum(-1).chunk(2)
            average = chosen_ratio / chosen_n.clamp(min=1) - rejected_ratio / rejected_n.clamp(min=1)
            losses = (average - 1 / (2 * s.beta)) ** 2
        else:  # robust: unbiased under a share `label_smoothing` of flipped judgements
            eps = s.label_smoothing
            losses = (-(1 - eps) * F.logsigmoid(s.beta * delta) + eps * F.logsigmoid(-s.beta * delta)) / (1 - 2 * eps)
        rows = _pair_rows(s.beta * chosen_ratio, s.beta * rejected_ratio, chosen, rejected)
        return Step(losses.mean(), rows, _pair_stats(rows))


class ORPO(Objective):
    """NLL of the chosen answers minus beta x log-sigmoid of the log odds ratio (mean token log-probabilities).

    As TRL's ORPOTrainer: the NLL covers the chosen sequence's prompt and answer for a decoder (every attended
    token), the decoder target for an encoder-decoder.
    """

    name = "orpo"  # not split into halves: its NLL is a token mean over the whole batch, as TRL's

    def step(self, model: torch.nn.Module, batch: dict) -> Step:
        beta = self.settings.beta
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.encoder_decoder:
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
            logits, targets = out.logits, labels
            nll_logits, nll_targets = logits, labels
        else:  # the NLL covers the prompt too: every position's logits are needed
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits, targets = logits[:, :-1], labels[:, 1:]
            nll_logits = logits
            nll_targets = input_ids.masked_fill(attention_mask == 0, IGNORE)[:, 1:]
        half = input_ids.shape[0] // 2
        nll = F.cross_entropy(
            nll_logits[:half].reshape(-1, nll_logits.shape[-1]).float(),
            nll_targets[:half].reshape(-1),
            ignore_index=IGNORE,
        )
        per_token, mask = label_logps(logits, targets)
        mean = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
        chosen, rejected = mean.chunk(2)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        loss = nll - beta * F.logsigmoid(log_odds).mean()
        rows = _pair_rows(beta * chosen, beta * rejected, chosen, rejected)
        return Step(loss, rows, {**_pair_stats(rows), "nll": nll.item()})


class KTO(Objective):
    """Unpaired thumbs: desirable completions pulled above, undesirable ones pushed below, a KL baseline.

    The baseline is the batch's mean log-ratio on mismatched (prompt, other completion) sequences, detached and
    clamped at 0, as TRL's KTOTrainer computes it.
    """

    name = "kto"
    needs_reference = True

    def step(self, model: torch.nn.Module, batch: dict) -> Step:
        s = self.settings
        half = batch["input_ids"].shape[0] // 2
        own = {k: batch[k][:half] for k in ("input_ids", "attention_mask", "labels")}
        mismatched = {k: batch[k][half:] for k in ("input_ids", "attention_mask", "labels")}
        logps = sequence_logps(model, **own, encoder_decoder=self.encoder_decoder)
        with torch.no_grad():
            kl_logps = sequence_logps(model, **mismatched, encoder_decoder=self.encoder_decoder)
        kl = (kl_logps - batch["ref_kl_logps"].to(kl_logps.dtype)).mean().detach().clamp(min=0)
        ratio = logps - batch["ref_logps"].to(logps.dtype)
        desirable = batch["desirable"]
        chosen_losses = 1 - torch.sigmoid(s.beta * (ratio[desirable] - kl))
        rejected_losses = 1 - torch.sigmoid(s.beta * (kl - ratio[~desirable]))
        losses = torch.cat((s.desirable_weight * chosen_losses, s.undesirable_weight * rejected_losses))
        rows = {"reward": (s.beta * ratio).detach(), "logps": logps.detach(), "desirable": desirable}
        return Step(losses.nanmean(), rows, {"kl": kl.item()})


def _pair_rows(chosen_reward, rejected_reward, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    return {
        "chosen_reward": chosen_reward.detach(),
        "rejected_reward": rejected_reward.detach(),
        "chosen_logps": chosen_logps.detach(),
        "rejected_logps": rejected_logps.detach(),
    }


def _pair_stats(rows: dict[str, torch.Tensor]) -> dict[str, float]:
    margin = rows["chosen_reward"] - rows["rejected_reward"]
    return {"reward_accuracy": (margin > 0).float().mean().item(), "reward_margin": margin.mean().item()}


# --------------------------------------------------------------------------- GRPO


def per_token_logps(
    model: torch.nn.Module, input_ids, attention_mask, labels, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder's log-probability of each label token at `temperature` (as sampled), and the label mask."""
    logits, labels = decoder_logits(model, input_ids, attention_mask, labels)
    return label_logps(logits.float() / temperature, labels)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's reward minus its group's mean, divided by the group's (unbiased) spread + 1e-4 when
    `scale`, as TRL's GRPO. Also each completion's "no signal" flag: its group's rewards are all equal."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    spread = grouped.std(1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale:
        advantages = advantages / (spread + 1e-4)
    return advantages, torch.isclose(spread, torch.zeros_like(spread))


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: GRPOSection,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy-gradient loss with a k3 KL penalty, normalised as `settings.loss_type` says (TRL's)."""
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - settings.epsilon, 1 + settings.epsilon)
    advantages = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if settings.beta != 0 and ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + settings.beta * kl
    if settings.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif settings.loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (per_token.size(0) * settings.max_new_tokens)
    tokens = mask.sum().clamp(min=1.0)
    clipped_out = ((ratio < 1 - settings.epsilon) & (advantages < 0)) | (
        (ratio > 1 + settings.epsilon) & (advantages > 0)
    )
    stats = {"clip_fraction": ((clipped_out.float() * mask).sum() / tokens).item()}
    if kl is not None:
        stats["kl"] = ((kl * mask).sum() / tokens).item()
    return loss, stats


Sampler = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], list[list[int]]]
Rewarder = Callable[[list[int], list[list[int]]], tuple[list[float], dict[str, int]]]


class GRPO(Objective):
    """For each prompt, sample a group, reward each completion with the task's own score, and push up what scored
    above its group. Each sampled batch is trained on once, so the old policy is the current one (ratio 1);
    the reference policy (the base, or the starting adapter) is a peft switch, not a second model."""

    name = "grpo"

    def __init__(
        self,
        settings: GRPOSection,
        sampler: Sampler,
        rewarder: Rewarder,
        eos_ids: tuple[int, ...],
        pad_id: int,
        reference_adapter: str | None = None,
    ):
        super().__init__(PreferenceSection(), encoder_decoder=False)
        self.grpo = settings
        self.sampler, self.rewarder = sampler, rewarder
        self.eos_ids, self.pad_id, self.reference_adapter = eos_ids, pad_id, reference_adapter

    def step(self, model: torch.nn.Module, batch: dict) -> Step:
        s = self.grpo
        prompt_ids, prompt_mask, rows = batch["prompt_ids"], batch["prompt_mask"], batch["row"].tolist()
        completions = self.sampler(model, prompt_ids, prompt_mask, s.group_size)
        owners = [row for row in rows for _ in range(s.group_size)]
        values, reasons = self.rewarder(owners, completions)
        rewards = torch.tensor(values, dtype=torch.float32)
        advantages, no_signal = group_advantages(rewards, s.group_size, s.scale_rewards)
        input_ids, attention_mask, labels = self._sequences(prompt_ids, prompt_mask, completions)
        logps, mask = per_token_logps(model, input_ids, attention_mask, labels, s.temperature)
        ref = None
        if s.beta != 0:
            with torch.no_grad(), reference_policy(model, self.reference_adapter):
                ref, _ = per_token_logps(model, input_ids, attention_mask, labels, s.temperature)
        loss, stats = grpo_loss(logps, logps.detach(), ref, advantages.to(logps.device), mask, s)
        stats |= {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "no_signal_groups": no_signal.float().mean().item(),
            "completion_length": float(sum(len(c) for c in completions) / len(completions)),
            **{f"reward_reason_{reason}": float(count) for reason, count in reasons.items()},
        }
        return Step(loss, {"reward": rewards}, stats, tokens=attention_mask.sum())

    def _sequences(self, prompt_ids, prompt_mask, completions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + completion per sample, right-padded (positions as in training); labels on the completion.
        A completion is trained up to and including its end token, as sampled."""
        sequences, labels = [], []
        for index, completion in enumerate(completions):
            row = index // self.grpo.group_size
            prompt = prompt_ids[row][prompt_mask[row].bool()].tolist()
            sequences.append(prompt + completion)
            labels.append([IGNORE] * len(prompt) + completion)
        width = max(len(x) for x in sequences)
        device = prompt_ids.device
        return (
            torch.tensor([x + [self.pad_id] * (width - len(x)) for x in sequences], device=device),
            torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in sequences], device=device),
            torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels], device=device),
        )


OBJECTIVES: dict[str, type[Objective]] = {"sft": Objective, "dpo": DPO, "orpo": ORPO, "kto": KTO, "grpo": GRPO}


def make_objective(name: str, settings: PreferenceSection, encoder_decoder: bool) -> Objective:
    """The objectives whose loss needs nothing but the batch (GRPO, which samples and scores, is built by its flow)."""
    assert name != "grpo", "GRPO needs a sampler and a rewarder: finetune.flows.session builds it"
    return OBJECTIVES[name](settings, encoder_decoder)


# --------------------------------------------------------------------------- the reference policy


@contextmanager
def reference_policy(model: torch.nn.Module, adapter: str | None) -> Iterator[None]:
    """The model as the reference policy: its `adapter` (a second, frozen peft adapter already loaded under that
    name), or with every adapter disabled (the base model). Restores the trained adapter on the way out."""
    from peft import PeftModel

    model = getattr(model, "module", model)  # the model itself, not a DDP wrapper
    if not isinstance(model, PeftModel):
        yield  # a model without adapters (a base model evaluated as such) is its own reference
        return
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(active)
        # set_adapter changes which adapter is trainable: every flag goes back to what it was.
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    features: Dataset,
    collate: Callable[[list[dict]], dict],
    batch_size: int,
    accelerator: Accelerator,
    encoder_decoder: bool,
    policy: Any = None,
) -> dict[str, list[float]]:
    """Per-row reference log-probabilities of a preference dataset, in its row order (eval mode, no dropout).

    `policy` is a context manager that turns `model` into the reference policy; None: the model as it is (before
    training, the starting point itself)."""
    was_training = model.training
    model.eval()
    pairs = sides_of(features.column_names) == PAIR_SIDES
    first, second = [], []
    try:
        with policy if policy is not None else nullcontext():
            for batch in eval_loader(features, collate, batch_size, accelerator):
                with accelerator.autocast():
                    logps = sequence_logps(
                        model, batch["input_ids"], batch["attention_mask"], batch["labels"], encoder_decoder
                    )
                a, b = logps.float().chunk(2)
                a, b = accelerator.gather_for_metrics((a, b))
                first.append(a.cpu())
                second.append(b.cpu())
    finally:
        model.train(was_training)
    names = ("ref_chosen_logps", "ref_rejected_logps") if pairs else ("ref_logps", "ref_kl_logps")
    return {names[0]: torch.cat(first).tolist(), names[1]: torch.cat(second).tolist()}


def with_columns(features: Dataset, columns: dict[str, list[float]]) -> Dataset:
    for name, values in columns.items():
        if name in features.column_names:
            features = features.remove_columns(name)
        features = features.add_column(name, values)
    return features
