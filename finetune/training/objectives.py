"""Training objectives: what the loop minimises for one batch (`train.objective`).

sft is the model's own cross-entropy on the reference completion. The preference objectives score whole
completions by their summed token log-probabilities (DPO, KTO) or their mean (ORPO) under the policy, and, for
DPO and KTO, under the reference policy: the starting point of training (the base model with fresh LoRA, or
the adapter named by `model.adapter`), whose log-probabilities are computed once before training
(`reference_logps`) so no second copy of the model is ever held. Each loss equals TRL's implementation of the
same name on the same batch (tests/training/test_preference.py compares them).

Every decoder objective scores tokens through `next_token_logps`: logits are made only at the positions that
predict a label, a chunk at a time, and never kept for the backward pass (tests/training/test_objectives_memory.py
compares it with the full logits).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from finetune.evaluation.scoring import eval_loader
from finetune.recipe.schema import GRPOSection, PreferenceSection
from finetune.tasks.preference import PAIR_SIDES, sides_of

IGNORE = -100

# --------------------------------------------------------------------------- log-probabilities where labels are

# The vocabulary projection is made for this many bytes of scored positions at a time: per row, float32
# log-probabilities (turned into their gradient in place) and the logits and gradient in the compute dtype, about
# 8 bytes a vocabulary entry (SmolLM2's 49,152 entries: 256 rows). On 2,048 positions x 49,152 entries in bf16 this
# took 0.7x the time of full logits + cross_entropy and ~1.1 GB less peak memory (bench/README.md).
CHUNK_BYTES = 96 * 2**20


class LinearCrossEntropy(torch.autograd.Function):
    """-log softmax(hidden @ weight.T + bias)[target] per row, `rows` rows at a time: the [rows x vocabulary]
    logits never exist whole and none are kept for the backward pass.

    The gradient with respect to `hidden` is made in the forward pass, chunk by chunk, while each chunk's
    probabilities are at hand (as Liger's fused linear cross-entropy does on GPUs), so the backward pass only
    scales it by each row's incoming gradient. The weight and bias are frozen (`plain_head` sees to it). The
    projection runs in `dtype` (what the model's own head ran in: bf16 under autocast), its softmax in float32,
    as transformers' loss does on the model's logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, dtype: torch.dtype, grads: bool):
        rows = max(1, CHUNK_BYTES // (8 * weight.shape[0]))
        count = hidden.shape[0]
        precise = torch.promote_types(dtype, torch.float32)  # the softmax's dtype: float32 at least
        nll = torch.empty(count, dtype=precise, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads else None
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit: `dtype`
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, count, rows):
                stop = min(start + rows, count)
                chosen = targets[start:stop]
                logits = F.linear(hidden[start:stop].to(dtype), w, b)
                if temperature != 1.0:
                    logits = logits.to(precise) / temperature
                logps = torch.log_softmax(logits, -1, dtype=precise)
                del logits
                nll[start:stop] = -logps.gather(1, chosen.unsqueeze(1)).squeeze(1)
                if grad_hidden is not None:  # d nll / d logits = softmax - one_hot(target), over the temperature
                    probs = logps.exp_()
                    probs[torch.arange(stop - start, device=probs.device), chosen] -= 1.0
                    if temperature != 1.0:
                        probs /= temperature
                    grad_hidden[start:stop] = probs.to(dtype) @ w
                del logps
        ctx.save_for_backward(grad_hidden)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_nll.unsqueeze(1).to(grad_hidden.dtype), None, None, None, None, None, None


# Per causal LM: are its logits its output layer applied to its last hidden states? (decided once, by a probe)
_PLAIN_LOGITS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP wrapper and a peft model."""
    model = getattr(model, "module", model)
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def plain_head(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.nn.Linear | None:
    """The frozen output layer of a causal LM whose logits are that layer applied to `hidden_states[-1]`, nothing
    more; None for every other model (no vocabulary head, soft-capped or scaled logits, a head being trained),
    which is scored from its own full logits. `input_ids`: a few real tokens for the one-time probe."""
    if isinstance(model, FullyShardedDataParallel):  # its weights are whole only inside its own forward
        return None
    base = causal_lm(model)
    output_layer = getattr(base, "get_output_embeddings", None)
    head = output_layer() if callable(output_layer) else None
    if type(head) is not torch.nn.Linear or any(p.requires_grad or isinstance(p, DTensor) for p in head.parameters()):
        return None
    plain = _PLAIN_LOGITS.get(base)
    if plain is None:
        plain = _PLAIN_LOGITS[base] = _logits_are_the_head(base, head, input_ids)
    return head if plain else None


def _logits_are_the_head(base: torch.nn.Module, head: torch.nn.Linear, input_ids: torch.Tensor) -> bool:
    """Whether `base`'s logits equal `head` applied to its last hidden states, on the first tokens of one row. An
    architecture that soft-caps or scales its logits (Gemma 2, Granite, ...) or whose `hidden_states[-1]` is not
    what its head reads differs here. Evaluation mode and a forked generator: no dropout mask is drawn."""
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = base(input_ids=input_ids[:1, :16], use_cache=False, output_hidden_states=True, logits_to_keep=1)
    finally:
        base.train(was_training)
    if getattr(out, "hidden_states", None) is None or out.logits is None:
        return False
    ours = F.linear(out.hidden_states[-1][:, -1:], head.weight, head.bias)
    return ours.shape == out.logits.shape and torch.allclose(ours, out.logits, rtol=1e-4, atol=1e-4)


def next_token_logps(
    model: torch.nn.Module, inputs: dict, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder's log-probability of each next token in `targets` (aligned with `inputs["input_ids"]`, -100 where
    nothing is scored) at `temperature`: [batch, width - 1], 0 where not scored, and the mask of scored positions.

    Logits are made only where a target is (`LinearCrossEntropy`), never for prompt or padding positions: the
    projection onto a 49k vocabulary is the largest matmul of a small model and its float32 logits the largest
    tensor of a step. A model whose logits are not plain (`plain_head`) is scored from its own full logits.
    """
    targets = targets[:, 1:]
    inputs = {**inputs, "use_cache": False}
    head = plain_head(model, inputs["input_ids"])
    if head is None:
        logits = model(**inputs).logits[:, :-1]
        return label_logps(logits.float() / temperature, targets)
    mask = targets != IGNORE
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    hidden, dtype = out.hidden_states[-1][:, :-1][mask], out.logits.dtype
    # The model's one position of logits keeps its own low-precision copy of the head's weight for a backward pass
    # that never comes (a vocabulary x hidden tensor: 56 MB for SmolLM2 in bf16): dropped before the chunks make theirs.
    del out
    grads = torch.is_grad_enabled() and hidden.requires_grad
    nll = LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets[mask], temperature, dtype, grads)
    # masked_scatter keeps a batch without any target connected to the graph (a zero loss, not a failed backward).
    return (-nll).new_zeros(mask.shape).masked_scatter(mask, -nll), mask


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label token's log-probability under aligned `logits` (0 where the label is -100), and the label mask.

    log_softmax at the label only: gather minus logsumexp, never a second vocabulary-sized tensor of logps.
    """
    mask = labels != IGNORE
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)
    logits = logits.float()
    per_token = torch.gather(logits, -1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return per_token * mask, mask


def sequence_logps(
    model: torch.nn.Module, input_ids, attention_mask, labels, encoder_decoder: bool, average: bool = False
) -> torch.Tensor:
    """Each sequence's summed (or mean) log-probability of its label tokens (labels -100 are not scored).

    A decoder predicts token t+1 at position t (`next_token_logps`); an encoder-decoder's logits are aligned with
    its labels.
    """
    if encoder_decoder:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).logits
        per_token, mask = label_logps(logits, labels)
    else:
        per_token, mask = next_token_logps(model, {"input_ids": input_ids, "attention_mask": attention_mask}, labels)
    total = per_token.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


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
        """The mean cross-entropy of the label tokens: the model's own loss, computed where the labels are for a
        decoder whose head allows it (`next_token_logps`), by the model itself for any other (a classifier's
        labels are not per token)."""
        labels = batch.get("labels")
        if (
            self.encoder_decoder
            or labels is None
            or labels.shape != batch["input_ids"].shape
            or plain_head(model, batch["input_ids"]) is None
        ):
            return Step(model(**batch).loss, {})
        logps, mask = next_token_logps(model, {k: v for k, v in batch.items() if k != "labels"}, labels)
        return Step(-logps.sum() / mask.sum(), {})

    def parts(self, batch: dict) -> list[tuple[dict, float]]:
        """The batch as the loop runs it: parts, each with its weight in the batch's mean loss."""
        return [(batch, 1.0)]

    def logps(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], self.encoder_decoder)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a checkpoint must carry, beyond the weights, optimizer and generators, for a resumed run to go on
        exactly: tensors and JSON facts (GRPO's sampled batches still to be trained on; nothing for the others)."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], facts: dict) -> None:
        assert not tensors and not facts, f"{self.name} carries no state between steps"


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
        half = input_ids.shape[0] // 2
        if self.encoder_decoder:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:half].reshape(-1, logits.shape[-1]).float(), labels[:half].reshape(-1), ignore_index=IGNORE
            )
            per_token, mask = label_logps(logits, labels)
        else:  # the NLL covers the chosen prompts too: every attended position of the chosen half is scored
            attended = input_ids.masked_fill(attention_mask == 0, IGNORE)
            attended[half:] = IGNORE
            # Where a label is, it is the next input token: one pass scores both the NLL's and the labels' tokens.
            scored = torch.where(labels != IGNORE, labels, attended)
            logps, _ = next_token_logps(model, {"input_ids": input_ids, "attention_mask": attention_mask}, scored)
            nll_mask = attended[:, 1:] != IGNORE
            nll = -(logps * nll_mask).sum() / nll_mask.sum()
            mask = labels[:, 1:] != IGNORE
            per_token = logps * mask
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
    return next_token_logps(model, {"input_ids": input_ids, "attention_mask": attention_mask}, labels, temperature)


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
        # TRL's default: the k3 estimate is for the sampling policy's tokens; the ratio re-weights it to the current
        # policy (1 in value on a first pass, but not in gradient).
        weighted = kl * ratio if settings.kl_bias_correction else kl
        per_token = per_token + settings.beta * weighted
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


@dataclass
class Rollout:
    """One sampled batch, scored, as every pass over it trains on it: the sequences (prompt + completion, labels on
    the completion), each completion's advantage, and with num_iterations > 1 the log-probabilities the sampling
    policy and the reference gave it when it was sampled (the later passes' policy has moved since)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    stats: dict[str, float]  # what the sampling found (rewards, groups without signal, lengths, sandbox reasons)
    passes: int = 0

    TENSORS = ("input_ids", "attention_mask", "labels", "rewards", "advantages", "old_logps", "ref_logps")

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        values = {name: getattr(self, name) for name in self.TENSORS}
        return {f"{prefix}{name}": value.cpu().contiguous() for name, value in values.items() if value is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, stats: dict, passes: int) -> Rollout:
        values = {name: tensors.get(f"{prefix}{name}") for name in cls.TENSORS}
        return cls(**values, stats=stats, passes=passes)  # type: ignore[arg-type]

    def to(self, device: torch.device) -> Rollout:
        for name in self.TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


Sampler = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], list[list[int]]]
Rewarder = Callable[[list[int], list[list[int]]], tuple[list[float], dict[str, int]]]


class GRPO(Objective):
    """For each prompt, sample a group, reward each completion with the task's own score, and push up what scored
    above its group. With num_iterations 1 each sampled batch is trained on once, so the old policy is the current
    one (ratio 1); with more, the loop repeats the batch and the later passes train on the kept rollout, against
    the log-probabilities its sampling policy gave it (TRL's num_iterations). The reference policy (the base, or
    the starting adapter) is a peft switch, not a second model."""

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
        # Rollouts with passes left, by the batch's rows: the loop hands the same batch over num_iterations times.
        self.rollouts: dict[str, Rollout] = {}

    def step(self, model: torch.nn.Module, batch: dict) -> Step:
        s = self.grpo
        key = ",".join(str(row) for row in batch["row"].tolist())
        rollout = self.rollouts.pop(key, None) or self._rollout(model, batch)
        rollout.to(batch["prompt_ids"].device)
        logps, mask = per_token_logps(model, rollout.input_ids, rollout.attention_mask, rollout.labels, s.temperature)
        ref = rollout.ref_logps
        if ref is None and s.beta != 0:  # one pass a rollout: the reference read after the policy, as always
            ref = self._reference_logps(model, rollout)
        old = logps.detach() if rollout.old_logps is None else rollout.old_logps
        loss, stats = grpo_loss(logps, old, ref, rollout.advantages, mask, s)
        rollout.passes += 1
        if rollout.passes < s.num_iterations:
            self.rollouts[key] = rollout
        return Step(loss, {"reward": rollout.rewards}, stats | rollout.stats, tokens=rollout.attention_mask.sum())

    def _rollout(self, model: torch.nn.Module, batch: dict) -> Rollout:
        """Sample each prompt's group, score it, and (num_iterations > 1) read what the sampling policy and the
        reference make of it now, before any pass moves the policy."""
        s = self.grpo
        prompt_ids, prompt_mask, rows = batch["prompt_ids"], batch["prompt_mask"], batch["row"].tolist()
        completions = self.sampler(model, prompt_ids, prompt_mask, s.group_size)
        owners = [row for row in rows for _ in range(s.group_size)]
        values, reasons = self.rewarder(owners, completions)
        rewards = torch.tensor(values, dtype=torch.float32)
        advantages, no_signal = group_advantages(rewards, s.group_size, s.scale_rewards)
        input_ids, attention_mask, labels = self._sequences(prompt_ids, prompt_mask, completions)
        stats = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "no_signal_groups": no_signal.float().mean().item(),
            "completion_length": float(sum(len(c) for c in completions) / len(completions)),
            **{f"reward_reason_{reason}": float(count) for reason, count in reasons.items()},
        }
        rollout = Rollout(
            input_ids, attention_mask, labels, rewards, advantages.to(input_ids.device), None, None, stats
        )
        if s.num_iterations > 1:
            with torch.no_grad():
                rollout.old_logps, _ = per_token_logps(model, input_ids, attention_mask, labels, s.temperature)
            if s.beta != 0:
                rollout.ref_logps = self._reference_logps(model, rollout)
        return rollout

    def _reference_logps(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        with torch.no_grad(), reference_policy(model, self.reference_adapter):
            ref, _ = per_token_logps(
                model, rollout.input_ids, rollout.attention_mask, rollout.labels, self.grpo.temperature
            )
        return ref

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        facts = {}
        for index, (key, rollout) in enumerate(self.rollouts.items()):
            tensors |= rollout.tensors(f"{index}.")
            facts[key] = {"index": index, "passes": rollout.passes, "stats": rollout.stats}
        return tensors, ({"rollouts": facts} if facts else {})

    def load_state(self, tensors: dict[str, torch.Tensor], facts: dict) -> None:
        self.rollouts = {
            key: Rollout.from_tensors(tensors, f"{fact['index']}.", fact["stats"], fact["passes"])
            for key, fact in facts.get("rollouts", {}).items()
        }

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
