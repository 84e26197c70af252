"""The learned watermark: a message written into the text by the model itself, and read back by an extractor.

Cross-attention watermarking (Baldassini et al., ICASSP 2024, arXiv 2401.06829): a decoder's top layers attend,
through a small gated cross-attention block each, to an embedding of a k-bit message; an extractor (a few
bidirectional transformer layers over the decoder's own frozen token embeddings, so no vocabulary mapping is
needed) reads k bit logits back from the text alone. The two are trained together (finetune.training.
watermark_objective): the decoder's tokens made differentiable with a straight-through Gumbel-softmax and fed
through the embedding matrix into the extractor, a binary cross-entropy on the bits, and a KL term that keeps the
marked distribution close to the unmarked one. Random messages per batch, so the extractor reads any message.

The blocks are attached by forward hooks on the decoder's layers, so `generate` needs nothing but the message set
on the model (`LearnedWatermark.set_message`): every forward, cached decoding too, adds the gated attention over
the message (the message is k memory vectors, so a KV cache of the text never needs them). With no message (or a
gate still at zero), the hooked model computes exactly what the plain model computes.

Detection needs the extractor and the run's message: per text, the decoded bits, the share matching the message
and a one-sided test of the matches. An extractor has habits: from any text of a kind it may read mostly the same
bits, and a message that happens to lie near them would flag unmarked text far more often than a fair 1/2 per bit
says (measured: 14 of 32 human references flagged). So every save of the adapter also reads the run's own training
references, unmarked human text, and records how often each bit place reads 1 there (`CALIBRATION_FILE`); under
"unmarked", bit i then matches with that probability (or its complement), and the matches' tail is the
Poisson-binomial one. A run saved before the calibration existed is tested at 1/2 per bit, as it was.

The blocks cannot live in a GGUF file (llama.cpp runs no extra cross-attention), so merge/export refuse a
learned-watermark run (`refuse_export`).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from finetune.errors import RecipeError
from finetune.files import weights_with_umask, write_json
from finetune.models.families import FamilySpec
from finetune.recipe.schema import REDACTED, Recipe, WatermarkSection

MESSAGE_FILE = "watermark.message"  # beside watermark.key, mode 0600
WEIGHTS_FILE = "learned_watermark.safetensors"
LAYOUT_FILE = "learned_watermark.json"
CALIBRATION_FILE = "learned_watermark_calibration.json"  # what the extractor reads from unmarked text
# The name the watermark module takes on the model: its parameters are "learned_watermark.*", trained and
# checkpointed with the LoRA weights (the loop and checkpoints take every parameter with requires_grad).
ATTRIBUTE = "learned_watermark"
MAX_POSITIONS = 1024


def is_learned(settings: WatermarkSection | None) -> bool:
    return settings is not None and settings.method == "learned"


# --------------------------------------------------------------------------- the message


def check_message(text: str, bits: int, where: str) -> str:
    """A message of exactly `bits` characters 0/1, or a RecipeError (exit 2) naming `where` (never the message)."""
    if len(text) != bits or set(text) - {"0", "1"}:
        raise RecipeError(f"{where}: a message is a string of exactly {bits} characters 0 or 1 (eval.watermark.bits)")
    return text


def message_from_key(key: int, bits: int) -> str:
    """The run's message when the recipe gives none: drawn from the run's secret key (a fresh key, a fresh message;
    the same key, the same message), with its own stream apart from SynthID's layer keys."""
    generator = random.Random(f"learned-watermark-message:{key}")
    return "".join(str(generator.getrandbits(1)) for _ in range(bits))


def run_message(settings: WatermarkSection, adapter_dir: Path | None = None) -> str:
    """The message a run marks with: the recipe's (or the command line's), else the one kept beside its adapter,
    else the one its key draws."""
    if isinstance(settings.message, str) and settings.message != REDACTED:
        return check_message(settings.message, settings.bits, "eval.watermark.message")
    if adapter_dir is not None and (adapter_dir / MESSAGE_FILE).is_file():
        return read_message(adapter_dir, settings.bits)
    if settings.message == REDACTED:  # the run chose a message and it is not beside the adapter: never another one
        where = adapter_dir / MESSAGE_FILE if adapter_dir is not None else MESSAGE_FILE
        raise RecipeError(f"{where}: the run's message is missing; give it as eval.watermark.message (or --message)")
    if not isinstance(settings.key, int):
        raise RecipeError("eval.watermark.message: no message and no key to draw it from; give eval.watermark.message")
    return message_from_key(settings.key, settings.bits)


def write_message(directory: Path, settings: WatermarkSection) -> None:
    """The run's message beside its key, readable by its owner only."""
    message = run_message(settings)
    path = directory / MESSAGE_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(f"{message}\n")


def read_message(adapter_dir: Path, bits: int) -> str:
    path = adapter_dir / MESSAGE_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        text = ""
    return check_message(text, bits, str(path))


def as_bits(message: str, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([int(c) for c in message], dtype=torch.long, device=device)


# --------------------------------------------------------------------------- the modules


class GatedCrossAttention(nn.Module):
    """hidden + tanh(gate) * attention(norm(hidden), message memory): the gate starts at zero (Flamingo's gated
    cross-attention), so training starts from the unchanged model."""

    def __init__(self, width: int, heads: int, gate_scale: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))
        # Scaled, the gate moves gate_scale times as far per step as at its learning rate (eval.watermark.lr,
        # else the LoRA's), while its value at zero stays exactly zero. Scaled by 3 or 30 instead of 10, or the
        # block closed by a zero output projection under an open gate, it learnt no faster on the tests' tiny
        # decoder (docs/watermarks.md).
        self.gate_scale = gate_scale

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        dtype = self.norm.weight.dtype
        attended, _ = self.attention(self.norm(hidden.to(dtype)), memory, memory, need_weights=False)
        return hidden + (torch.tanh(self.gate * self.gate_scale) * attended).to(hidden.dtype)


class Extractor(nn.Module):
    """k bit logits from token embeddings: each token's vote (a linear map of its normalised projection, averaged
    over the text) plus a few bidirectional transformer layers over the tokens and their places.

    The votes read the code a decoder with tied embeddings writes most simply (the message shifts the hidden
    state, so the head favours tokens whose embeddings lie along it); they learn in tens of steps where the
    transformer alone, from random weights, took hundreds (measured on the tests' tiny decoder). The transformer's
    head starts at zero: it adds what context tells once it has learnt something."""

    def __init__(self, bits: int, embedding_width: int, width: int, layers: int, heads: int, positions: int):
        super().__init__()
        self.positions = positions
        # A decoder's token embeddings are small (std about 0.02-0.1): normalised after the projection, and the
        # positions start as small, so the tokens are not drowned by where they stand.
        self.project = nn.Sequential(nn.Linear(embedding_width, width), nn.LayerNorm(width))
        self.vote = nn.Linear(width, bits)
        self.position = nn.Embedding(positions, width)
        nn.init.normal_(self.position.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, bits)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        embeddings, mask = embeddings[:, : self.positions], mask[:, : self.positions].bool()
        places = torch.arange(embeddings.shape[1], device=embeddings.device)
        tokens = self.project(embeddings.to(self.position.weight.dtype))
        weights = mask.to(tokens.dtype)[..., None]
        count = weights.sum(1).clamp(min=1)
        votes = self.vote((tokens * weights).sum(1) / count)
        x = self.norm(self.encoder(tokens + self.position(places)[None], src_key_padding_mask=~mask))
        return votes + self.head((x * weights).sum(1) / count)


# The parts of a Layout that eval.watermark's settings decide (embedder_layers decides `layers`).
SETTING_SHAPED = ("layers", "extractor_width", "extractor_layers", "gate_scale")


@dataclass(frozen=True)
class Layout:
    """The shapes of a learned watermark, saved beside its weights so that a run loads what it trained."""

    bits: int
    hidden_width: int
    heads: int
    layers: tuple[int, ...]  # the decoder layers whose output attends to the message
    embedding_width: int
    extractor_width: int
    extractor_layers: int
    positions: int
    gate_scale: float

    @classmethod
    def read(cls, path: Path) -> Layout:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{**data, "layers": tuple(data["layers"])})


class LearnedWatermark(nn.Module):
    """The message embedding, the gated cross-attention blocks and the extractor, with the message the hooked
    model marks with now (None: no mark)."""

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        self.memory = nn.Embedding(2 * layout.bits, layout.hidden_width)  # one vector per (bit place, bit value)
        nn.init.normal_(self.memory.weight, std=1.0)
        self.blocks = nn.ModuleList(
            GatedCrossAttention(layout.hidden_width, layout.heads, layout.gate_scale) for _ in layout.layers
        )
        extractor_heads = next(h for h in (8, 4, 2, 1) if layout.extractor_width % h == 0)
        self.extractor = Extractor(
            layout.bits,
            layout.embedding_width,
            layout.extractor_width,
            layout.extractor_layers,
            extractor_heads,
            layout.positions,
        )
        self.message: torch.Tensor | None = None  # (bits,) or (batch, bits) of 0/1
        # P(the extractor reads 1 at each bit place | unmarked text), from `calibrate`; None: 1/2 assumed.
        self.ones_rate: list[float] | None = None
        # The peak learning rate of these modules in training (eval.watermark.lr; None: the LoRA's), read by the
        # loop's make_optimizer: a setting of the run, not of the weights, so not in the layout.
        self.lr: float | None = None
        # The decoder's input embedding matrix, frozen and shared, not a parameter of this module (never saved or
        # trained twice): a plain attribute, set by `attach`.
        self._embeddings: list[nn.Embedding] = []

    @property
    def token_embeddings(self) -> torch.Tensor:
        return self._embeddings[0].weight.detach()

    def gates(self) -> torch.Tensor:
        """Each block's gate (0: that block adds nothing)."""
        return torch.stack([block.gate.detach() for block in self.blocks if isinstance(block, GatedCrossAttention)])

    def message_text(self) -> str:
        """The one message the model marks with now, as 0/1 characters."""
        if self.message is None or self.message.dim() != 1:
            raise ValueError("the learned watermark marks with no single message now")
        return "".join(str(int(bit)) for bit in self.message.tolist())

    def set_message(self, message: torch.Tensor | str | None) -> None:
        self.message = as_bits(message, self.memory.weight.device) if isinstance(message, str) else message

    @contextmanager
    def messages(self, message: torch.Tensor | str | None) -> Iterator[None]:
        """The model marks with `message` (None: not at all) inside the block, and with the previous one after."""
        before = self.message
        self.set_message(message)
        try:
            yield
        finally:
            self.message = before

    def memory_for(self, batch: int) -> torch.Tensor:
        assert self.message is not None
        message = self.message if self.message.dim() == 2 else self.message[None]
        if message.shape[0] == 1 and batch != 1:
            message = message.expand(batch, -1)
        elif message.shape[0] != batch:
            raise ValueError(f"learned watermark: {message.shape[0]} messages for a batch of {batch}")
        places = torch.arange(self.layout.bits, device=message.device) * 2
        return self.memory(places[None] + message.long())

    def read_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bit logits of texts given as token ids (batch, length)."""
        return self.extractor(F.embedding(ids, self.token_embeddings), mask)

    def read_embeddings(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.extractor(embeddings, mask)


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder's stack of layers: the module list as long as the config's layer count."""
    config = model.config.get_text_config()
    if getattr(model.config, "is_encoder_decoder", False):  # validate refuses it first (family_problems)
        raise RecipeError("eval.watermark.method: learned is built for GPT-family decoders, not encoder-decoders")
    count = config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise RecipeError(f"eval.watermark.method: learned: cannot find the {count} decoder layers of this model")


def new_layout(settings: WatermarkSection, model: Any) -> Layout:
    config = model.config.get_text_config()
    count, width = config.num_hidden_layers, config.hidden_size
    heads = next(h for h in (config.num_attention_heads, 8, 4, 2, 1) if width % h == 0)
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, nn.Embedding)
    top = min(settings.embedder_layers, count)
    return Layout(
        bits=settings.bits,
        hidden_width=width,
        heads=heads,
        layers=tuple(range(count - top, count)),
        embedding_width=embeddings.embedding_dim,
        extractor_width=settings.extractor_width,
        extractor_layers=settings.extractor_layers,
        # The extractor reads a text's first MAX_POSITIONS tokens: generations are far shorter, and a table as long
        # as the decoder's context (8192 for SmolLM2) would be most of the file.
        positions=min(int(getattr(config, "max_position_embeddings", MAX_POSITIONS) or MAX_POSITIONS), MAX_POSITIONS),
        gate_scale=settings.gate_scale,
    )


def attach(model: Any, watermark: LearnedWatermark) -> LearnedWatermark:
    """Hook `watermark` onto `model` (a transformers decoder, or peft's model around one): each chosen decoder
    layer's output passes through its gated cross-attention block whenever a message is set; the module becomes
    the model's `learned_watermark` child, so it is trained and checkpointed with the adapter."""
    layers = decoder_layers(model)
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, nn.Embedding)
    watermark._embeddings = [embeddings]
    device = embeddings.weight.device
    watermark.to(device)

    def hook_for(block: GatedCrossAttention) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            if watermark.message is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            marked = block(hidden, watermark.memory_for(hidden.shape[0]))
            return (marked, *output[1:]) if isinstance(output, tuple) else marked

        return hook

    for index, block in zip(watermark.layout.layers, watermark.blocks):
        assert isinstance(block, GatedCrossAttention)
        layers[index].register_forward_hook(hook_for(block))
    model.add_module(ATTRIBUTE, watermark)
    return watermark


def find(model: nn.Module) -> LearnedWatermark | None:
    """The learned watermark attached to `model` (or to the model a wrapper holds), if any."""
    for candidate in (model, getattr(model, "module", None)):
        found = getattr(candidate, ATTRIBUTE, None) if candidate is not None else None
        if isinstance(found, LearnedWatermark):
            return found
    return None


def fresh(model: Any, settings: WatermarkSection, message: str) -> LearnedWatermark:
    """New blocks (gates at zero) and extractor on `model`, marking with `message`."""
    watermark = attach(model, LearnedWatermark(new_layout(settings, model)))
    watermark.set_message(message)
    watermark.lr = settings.lr
    return watermark


def save(watermark: LearnedWatermark, directory: Path) -> None:
    """The watermark's weights and layout into `directory` (an adapter being written)."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in watermark.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    weights_with_umask(directory / WEIGHTS_FILE)
    layout = watermark.layout
    write_json(directory / LAYOUT_FILE, {**layout.__dict__, "layers": list(layout.layers)})


@torch.no_grad()
def calibrate(watermark: LearnedWatermark, texts: list[list[int]], batch_size: int = 32) -> dict:
    """How often the extractor reads 1 at each bit place from `texts` (token ids of unmarked text), counted, with
    the watermark's `ones_rate` set from the counts (add-one smoothed: no place is ever certain)."""
    bits, device = watermark.layout.bits, watermark.memory.weight.device
    ones = torch.zeros(bits, dtype=torch.long)
    texts = [t[: watermark.layout.positions] for t in texts if t]
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        width = max(len(t) for t in chunk)
        ids = torch.tensor([t + [0] * (width - len(t)) for t in chunk], device=device)
        mask = torch.tensor([[True] * len(t) + [False] * (width - len(t)) for t in chunk], device=device)
        ones += (watermark.read_ids(ids, mask) > 0).sum(0).cpu()
    counts = {"texts": len(texts), "ones": ones.tolist()}
    watermark.ones_rate = ones_rate(counts)
    return counts


def ones_rate(counts: dict) -> list[float] | None:
    if not counts.get("texts"):
        return None
    return [(ones + 1) / (counts["texts"] + 2) for ones in counts["ones"]]


def load(model: Any, adapter_dir: Path, settings: WatermarkSection, message: str) -> LearnedWatermark:
    """The trained watermark of the adapter in `adapter_dir`, attached to `model`, marking with `message`."""
    weights, layout_file = adapter_dir / WEIGHTS_FILE, adapter_dir / LAYOUT_FILE
    if not weights.is_file() or not layout_file.is_file():
        raise RecipeError(
            f"{adapter_dir}: eval.watermark.method is learned, but the adapter has no {WEIGHTS_FILE} (it was not "
            "trained with a learned watermark); remove eval.watermark or train the run with it"
        )
    layout = Layout.read(layout_file)
    if layout.bits != settings.bits:
        raise RecipeError(f"eval.watermark.bits: {settings.bits}, but the run's watermark carries {layout.bits} bits")
    # The blocks and the extractor are what was trained: settings that would shape them otherwise are refused, not
    # ignored (`eval RUN eval.watermark.extractor_width=32` scored the trained 16 silently).
    wanted = new_layout(settings, model)
    changed = [
        f"{name}: the run's watermark has {getattr(layout, name)}, these settings make {getattr(wanted, name)}"
        for name in SETTING_SHAPED  # what the model decides (widths, heads, positions) is the run's own model's
        if getattr(layout, name) != getattr(wanted, name)
    ]
    if changed:
        raise RecipeError(
            "eval.watermark: a learned watermark's shape is fixed by its training (" + "; ".join(changed) + "); "
            "drop those overrides"
        )
    watermark = LearnedWatermark(layout)
    watermark.load_state_dict(load_file(str(weights)))
    attach(model, watermark)
    watermark.requires_grad_(False)
    watermark.set_message(message)
    calibration = adapter_dir / CALIBRATION_FILE
    if calibration.is_file():
        watermark.ones_rate = ones_rate(json.loads(calibration.read_text(encoding="utf-8")))
    return watermark


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class BitScore:
    tokens: int
    message: str | None  # the decoded bits
    bit_accuracy: float | None  # the share of them matching the expected message
    p_value: float | None  # one-sided: this many matches or more from unmarked text (match_probabilities)
    watermarked: bool
    # The matches' normal score under the same per-bit chances as p_value (what the other watermarks report):
    # (matches - their expected number) / their spread; None for an empty text.
    z_score: float | None = None

    def as_dict(self) -> dict:
        return {
            "text_tokens": self.tokens,
            "message": self.message,
            "bit_accuracy": self.bit_accuracy,
            "z_score": self.z_score,
            "p_value": self.p_value,
            "watermarked": self.watermarked,
        }


def match_probabilities(message: str, ones: list[float] | None) -> list[float]:
    """Each bit's chance of matching `message` in unmarked text: the calibrated rate of reading 1 (or of reading
    0, where the message has a 0); 1/2 everywhere without a calibration."""
    if ones is None:
        return [0.5] * len(message)
    return [rate if bit == "1" else 1 - rate for bit, rate in zip(message, ones, strict=True)]


def match_tail(matches: int, probabilities: list[float]) -> float:
    """P(at least `matches` of independent bits match), bit i with probability `probabilities[i]`: the
    Poisson-binomial upper tail (the binomial's when every probability is 1/2). Exact for independent bits; an
    extractor's habits can tie bits together, which calibrating each place alone does not capture."""
    counts = [1.0]  # counts[m]: P(m matches among the bits so far)
    for p in probabilities:
        counts = [
            (counts[m] if m < len(counts) else 0.0) * (1 - p) + (counts[m - 1] * p if m else 0.0)
            for m in range(len(counts) + 1)
        ]
    return min(1.0, sum(counts[matches:]))


def false_positive_rate(probabilities: list[float], p_threshold: float) -> float:
    """How often unmarked text is flagged, bits taken as independent: the test is discrete, so the rate is the tail
    at the fewest matches whose p-value falls below the threshold (at most p_threshold)."""
    tails = [match_tail(m, probabilities) for m in range(len(probabilities) + 1)]
    flagged = [tail for tail in tails if tail < p_threshold]
    return flagged[0] if flagged else 0.0


class BitDetector:
    """Reads the message back from texts with the run's extractor and tests it against the expected message, at
    the per-bit match chances the run's calibration on unmarked text gives."""

    def __init__(self, tokenizer: Any, watermark: LearnedWatermark, message: str, p_threshold: float):
        self.tokenizer, self.watermark, self.p_threshold = tokenizer, watermark, p_threshold
        self.expected = check_message(message, watermark.layout.bits, "--message")
        self.probabilities = match_probabilities(self.expected, watermark.ones_rate)
        self.bayesian = None  # no trained second opinion (the synthid detector's slot)

    @property
    def calibrated(self) -> bool:
        return self.watermark.ones_rate is not None

    def false_positive_rate(self) -> float:
        return false_positive_rate(self.probabilities, self.p_threshold)

    def least_p_value(self) -> float:
        return match_tail(len(self.probabilities), self.probabilities)

    @torch.no_grad()
    def decode(self, text: str) -> tuple[int, str | None]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            return 0, None
        device = self.watermark.memory.weight.device
        tensor = torch.tensor([ids], device=device)
        logits = self.watermark.read_ids(tensor, torch.ones_like(tensor, dtype=torch.bool))[0]
        return len(ids), "".join("1" if v > 0 else "0" for v in logits.tolist())

    def score(self, text: str, prompt: str = "") -> BitScore:
        """The text's bits against the expected message (`prompt` is not needed: the extractor reads the text)."""
        tokens, decoded = self.decode(text)
        if decoded is None:
            return BitScore(0, None, None, None, False)
        bits = len(decoded)
        matches = sum(a == b for a, b in zip(decoded, self.expected))
        p = match_tail(matches, self.probabilities)
        expected = sum(self.probabilities)
        spread = math.sqrt(sum(q * (1 - q) for q in self.probabilities))
        z = (matches - expected) / spread if spread else None
        return BitScore(tokens, decoded, matches / bits, p, p < self.p_threshold, z)


# --------------------------------------------------------------------------- rules and refusals


def recipe_problems(recipe: Recipe) -> list[str]:
    """What a learned watermark cannot be combined with, from the recipe alone."""
    mark = recipe.eval.watermark
    if not is_learned(mark):
        return []
    problems = []
    if recipe.train.objective != "sft":
        problems.append(
            f"eval.watermark.method: a learned watermark trains with the sft objective; train.objective is "
            f"{recipe.train.objective}"
        )
    if recipe.train.packing:
        problems.append(
            "train.packing: a learned watermark's extractor reads each completion on its own; packed rows mix "
            "them (set train.packing: false)"
        )
    return problems


def family_problems(settings: WatermarkSection | None, family: FamilySpec, place: str) -> list[str]:
    """A learned watermark is built for decoders (GPT-style); an encoder-decoder (BART) is refused."""
    if not is_learned(settings) or not family.encoder_decoder:
        return []
    return [
        f"eval.watermark.method: learned is built for GPT-family decoders; {place} is a {family.name}-family model "
        "(use kirchenbauer or synthid)"
    ]


def refuse_export(settings: WatermarkSection | None, what: str) -> None:
    """merge/export cannot carry the cross-attention blocks: refuse (exit 2) rather than write an unmarked model."""
    if is_learned(settings):
        raise RecipeError(
            f"{what}: the run carries a learned watermark, whose cross-attention blocks cannot live in a merged "
            "checkpoint or a GGUF file (llama.cpp runs no extra cross-attention); serve the adapter with finetune "
            "predict"
        )
