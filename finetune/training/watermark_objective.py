"""The joint loss of a learned watermark (finetune.watermark.learned), around the task's own sft objective.

One batch of prompt -> completion rows, two forwards of the same model:
- unmarked (no message): the task's loss on the completion tokens, which trains the LoRA as a plain run would,
  and the reference distribution p0 (detached);
- marked with a random k-bit message per row: pw. KL(pw || p0) per completion token keeps the mark's cost small;
  the marked next-token distributions become tokens by a straight-through Gumbel-softmax (the forward sees one-hot
  tokens, as detection will; the backward gets the soft gradients), which go through the decoder's frozen
  embedding matrix into the extractor, whose bit logits meet the message in a binary cross-entropy.

Teacher forcing: each position's token is drawn given the reference prefix, not the drawn prefix (as the paper
trains). Substitution noise replaces a fraction of the tokens the extractor reads by random vocabulary tokens.
Every random draw (messages, Gumbel noise, substitutions) comes from torch's global generator, which checkpoints
save and restore, so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from finetune.recipe.schema import WatermarkSection
from finetune.training.objectives import Objective, Step
from finetune.watermark.learned import LearnedWatermark, find

IGNORE = -100


def completion_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the places of its completion tokens first, in order (left-aligned), cut to the longest
    completion; and which of those places hold a token. The extractor reads a completion from its first token,
    as it reads a generated text at detection."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    width = max(int(mask.sum(1).max()), 1)
    order = order[:, :width]
    return order, torch.gather(mask, 1, order)


def substitute(
    embeddings: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token replaced, with probability `fraction`, by the embedding of a random vocabulary token (no
    gradient flows through a replaced token); also returns which were replaced."""
    if fraction <= 0:
        return embeddings, torch.zeros_like(mask)
    replaced = (torch.rand(mask.shape, device=mask.device) < fraction) & mask
    random_ids = torch.randint(0, table.shape[0], mask.shape, device=mask.device)
    noise = F.embedding(random_ids, table).to(embeddings.dtype)
    return torch.where(replaced[..., None], noise, embeddings), replaced


class LearnedWatermarkObjective(Objective):
    """sft plus the watermark's bits and KL (see the module's docstring). Its name stays the wrapped objective's."""

    def __init__(self, inner: Objective, settings: WatermarkSection):
        super().__init__(inner.settings, inner.encoder_decoder)
        self.inner, self.mark = inner, settings
        self.name = inner.name

    def parts(self, batch: dict) -> list[tuple[dict, float]]:
        return self.inner.parts(batch)

    def step(self, model: torch.nn.Module, batch: dict) -> Step:
        watermark = find(model)
        assert watermark is not None, "a learned watermark's objective needs the watermark attached to the model"
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = labels[:, 1:]
        order, kept = completion_order(targets != IGNORE)
        # Only the completion's places are scored: the vocabulary-wide float copies below (the memory of this
        # loss) are as long as the completions, not the prompts.
        with watermark.messages(None):
            plain = model(**inputs).logits[:, :-1]
        picked = order[..., None].expand(-1, -1, plain.shape[-1])
        plain_c = torch.gather(plain, 1, picked).float()
        del plain
        completion = torch.gather(targets, 1, order).masked_fill(~kept, IGNORE)
        task = F.cross_entropy(plain_c.transpose(1, 2), completion, ignore_index=IGNORE)
        rows, bits = labels.shape[0], watermark.layout.bits
        messages = torch.randint(0, 2, (rows, bits), device=labels.device)
        with watermark.messages(messages):
            marked = model(**inputs).logits[:, :-1]
        marked_c = torch.gather(marked, 1, picked).float()
        del marked
        log_marked, log_plain = F.log_softmax(marked_c, -1), F.log_softmax(plain_c.detach(), -1)
        kl_tokens = (log_marked.exp() * (log_marked - log_plain)).sum(-1)
        kl = (kl_tokens * kept).sum() / kept.sum().clamp(min=1)
        bce, accuracy = self.bits_loss(watermark, marked_c, kept, messages)
        loss = task + self.mark.kl_weight * kl + self.mark.bit_weight * bce
        stats = {
            "task_loss": float(task.detach()),
            "watermark_kl": float(kl.detach()),
            "watermark_bce": float(bce.detach()),
            "watermark_bit_accuracy": accuracy,
            "watermark_gate": float(watermark.gates().abs().mean()),
        }
        return Step(loss, {}, stats)

    def bits_loss(
        self, watermark: LearnedWatermark, logits: torch.Tensor, kept: torch.Tensor, messages: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """The extractor's BCE on straight-through Gumbel-softmax tokens of `logits` (rows, places, vocabulary),
        after substitution noise, and its bit accuracy on this batch."""
        tokens = F.gumbel_softmax(logits, tau=self.mark.gumbel_temperature, hard=True)
        table = watermark.token_embeddings
        embeddings = tokens @ table.to(tokens.dtype)
        embeddings, _ = substitute(embeddings, kept, table, self.mark.noise)
        bit_logits = watermark.read_embeddings(embeddings, kept)
        target = messages.to(bit_logits.dtype)
        bce = F.binary_cross_entropy_with_logits(bit_logits, target)
        accuracy = float(((bit_logits.detach() > 0) == messages.bool()).float().mean())
        return bce, accuracy
