"""The exported file loaded in llama.cpp itself (llama-cpp-python) against the merged model it came from.

Three comparisons, on the run's own eval data:

- tokenization: every text of the eval rows tokenized by llama.cpp from the file's metadata and by the trained
  tokenizer, special tokens as each adds them: identical, or the file is wrong (no tolerance);
- greedy continuations from the same prompt ids: identical token for token (up to EOS or `max_new_tokens`);
- next-token agreement: the argmax at every prompt position, teacher-forced.

An f16 file must continue at least `GREEDY_F16` of the prompts exactly (or part only where the merged model's own top
two logits nearly tie: `NEAR_TIE`); bf16 and q8_0 files round weights, which legitimately moves a near-tie argmax
now and then, so they are held to next-token agreement (`NEXT_TOKEN_ROUNDED`) instead. llama-cpp-python is an
optional extra that builds llama.cpp from source; without it `--verify` is refused.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.errors import RecipeError

GREEDY_F16 = 0.95
NEXT_TOKEN_ROUNDED = 0.95
# A continuation that parts where the merged model's own top two logits are closer than this share of the logits'
# spread parted on a coin flip f16 rounding decides (either engine could take either token): it is counted, not held
# against the file. A wrong tensor parts where the model is sure.
NEAR_TIE = 0.01
EXACT_QUANTS = ("f16",)
INSTALL = "pip install llama-cpp-python (it compiles llama.cpp: about 15-20 minutes on 2 cores)"


def require_llama_cpp() -> None:
    """Refuse `--verify` before anything loads when llama.cpp's Python binding is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise RecipeError(f"--verify: llama-cpp-python is not installed; {INSTALL}, or export without --verify.")


@dataclass
class Parity:
    quant: str
    texts: int = 0
    texts_identical: int = 0
    prompts: int = 0
    continuations_identical: int = 0
    continuations_near_tie: int = 0  # parted only where the merged model's top two logits (nearly) tie
    positions: int = 0
    next_token_agree: int = 0
    max_logit_diff: float = 0.0
    logit_std: float = 0.0
    mismatched_texts: list[dict[str, Any]] = field(default_factory=list)
    divergences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokenization(self) -> float:
        return self.texts_identical / self.texts if self.texts else 1.0

    @property
    def greedy(self) -> float:
        """Continuations identical, or parted only at a near-tie."""
        kept = self.continuations_identical + self.continuations_near_tie
        return kept / self.prompts if self.prompts else 1.0

    @property
    def next_token(self) -> float:
        return self.next_token_agree / self.positions if self.positions else 1.0

    def failures(self) -> list[str]:
        """What falls short of the thresholds for this file's type (empty: it passes)."""
        failed = []
        if self.texts_identical < self.texts:
            failed.append(f"tokenization differs on {self.texts - self.texts_identical} of {self.texts} texts")
        if self.quant in EXACT_QUANTS and self.greedy < GREEDY_F16:
            first = self.divergences[0] if self.divergences else {}
            where = (
                f"; the first parts at new token {first['step']}, where the merged model's top two logits are "
                f"{first['top2_margin']:.4g} apart"
                if first.get("top2_margin") is not None
                else ""
            )
            failed.append(
                f"greedy continuations identical (or parted at a near-tie) on {self.greedy:.1%} of prompts "
                f"(< {GREEDY_F16:.0%}){where}"
            )
        if self.quant not in EXACT_QUANTS and self.next_token < NEXT_TOKEN_ROUNDED:
            failed.append(f"next-token agreement {self.next_token:.1%} (< {NEXT_TOKEN_ROUNDED:.0%})")
        return failed

    def document(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "tokenization_identical": self.tokenization,
            "greedy_identical": self.greedy,
            "next_token_agreement": self.next_token,
            "passed": not self.failures(),
        }


def eval_texts(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every text in the eval rows: string fields, and the contents of conversation turns."""
    texts: list[str] = []
    for row in rows:
        for value in row.values():
            if isinstance(value, str) and value:
                texts.append(value)
            elif isinstance(value, list):
                texts += [turn["content"] for turn in value if isinstance(turn, dict) and turn.get("content")]
    return texts


def check_parity(
    gguf_file: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    quant: str,
    texts: Sequence[str],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    threads: int | None = None,
) -> Parity:
    """Load `gguf_file` in llama.cpp and compare it with `model` (the merged model it was written from)."""
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    llm = _load(gguf_file, n_ctx=max(longest + 8, 64), threads=threads)
    parity = Parity(quant)
    for text in texts:
        want = tokenizer(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        parity.texts += 1
        if list(got) == list(want):
            parity.texts_identical += 1
        elif len(parity.mismatched_texts) < 5:
            parity.mismatched_texts.append({"text": text, "transformers": want, "llama.cpp": list(got)})
    stops = _stop_ids(tokenizer, model)
    model.eval()
    for prompt in prompts:
        ids = list(prompt)
        if not ids:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        parity.positions += len(ids)
        parity.next_token_agree += int((theirs.argmax(-1) == logits.argmax(-1)).sum())
        parity.max_logit_diff = max(parity.max_logit_diff, float(np.abs(theirs - logits).max()))
        parity.logit_std = max(parity.logit_std, float(logits.std()))
        want_new, margins = _greedy_transformers(model, ids, max_new_tokens, stops)
        got_new = _greedy_llama_cpp(llm, ids, max_new_tokens, stops)
        parity.prompts += 1
        if want_new == got_new:
            parity.continuations_identical += 1
            continue
        step = next(i for i, (a, b) in enumerate(zip([*want_new, -1], [*got_new, -2])) if a != b)
        # where they part, and how close the merged model's own top two were there (rounding moves near-ties)
        margin = margins[step] if step < len(margins) else None
        if margin is not None and margin < NEAR_TIE * float(logits.std()):
            parity.continuations_near_tie += 1
        if len(parity.divergences) < 10:
            parity.divergences.append(
                {"prompt": ids, "step": step, "transformers": want_new, "llama.cpp": got_new, "top2_margin": margin}
            )
    if hasattr(llm, "close"):
        llm.close()
    return parity


def _load(gguf_file: Path, *, n_ctx: int, threads: int | None) -> Any:
    """The file in llama.cpp, with weights in their plain layout: llama.cpp's repacked CPU layouts (its "extra
    buffer types", AMX/repack) crash on Q8_0 on some CPUs (an AVX-512/AMX machine here, files from llama.cpp's own
    converter too), and the plain layout computes the same block products. llama-cpp-python does not expose the
    switch (`use_extra_bufts`), so its default model parameters are wrapped while the model loads."""
    from llama_cpp import Llama
    from llama_cpp import llama as binding

    defaults = binding.llama_cpp.llama_model_default_params

    def plain_layout() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    binding.llama_cpp.llama_model_default_params = plain_layout
    try:
        return Llama(
            model_path=str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=threads
        )
    finally:
        binding.llama_cpp.llama_model_default_params = defaults


def _stop_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> set[int]:
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    stops |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return stops


def _greedy_transformers(
    model: PreTrainedModel, ids: list[int], max_new_tokens: int, stops: set[int]
) -> tuple[list[int], list[float]]:
    """Greedy new tokens, and at each step the gap between the top two logits."""
    new: list[int] = []
    margins: list[float] = []
    past = None
    step = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            top = out.logits[0, -1].float().topk(2)
            token = int(top.indices[0])
            new.append(token)
            margins.append(float(top.values[0] - top.values[1]))
            if token in stops:
                break
            step = torch.tensor([[token]])
    return new, margins


def _greedy_llama_cpp(llm: Any, ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(token)
        if token in stops:
            break
        llm.eval([token])
    return new
