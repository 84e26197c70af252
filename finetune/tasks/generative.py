"""What every text-generation task shares: causal-LM or seq2seq models, completion-only loss, generation.

A subclass names its prompt and answer fields, its metrics and its default
stop strings; featurize/collate/predict come from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.data.conversations import conversation_fields, conversation_problems, final_turn, table_layout
from finetune.data.features import Features
from finetune.data.tables import checked_texts
from finetune.errors import DataError, RecipeError
from finetune.evaluation.preference import PREFERENCE_METRICS
from finetune.evaluation.scoring import REWARD_MEAN
from finetune.models.families import FAMILIES, FamilySpec
from finetune.recipe.schema import DataSection, EvalSection, Recipe
from finetune.tasks.base import Task, named_metrics
from finetune.tasks.conversations import (
    ConversationEncoder,
    featurize_conversations,
    references,
    rollout_conversations,
)
from finetune.tasks.preference import featurize_preferences, preference_fields, rollout_prompts
from finetune.tasks.text2text import PadCollator, completion_loss, decode_batch_size, encode, generate

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class Rewards:
    """One reward per prediction row, and why rows scored what they did (e.g. sandbox outcomes), counted."""

    values: list[float]
    reasons: dict[str, int] = field(default_factory=dict)


class GenerationTask(Task):
    prompt_field = "prompt"
    answer_field = "completion"  # the reference text, trained on and compared with
    default_stops: tuple[str, ...] = ()
    uses_template = True
    head = "generation"
    # Each prediction row carries its `sample` index even with one sample a prompt (codegen: pass@k tools key rows
    # on task and sample, as PRODUCT.md's predictions.jsonl says); elsewhere only where there are several.
    numbers_samples = False

    def check_recipe(self, recipe: Recipe) -> list[str]:
        problems = super().check_recipe(recipe)
        settings = recipe.eval
        if settings.best_metric in ("logps_chosen", "logps_rejected"):
            problems.append(
                f"eval.best_metric: {settings.best_metric} describes the answers, it is no measure of better; use "
                "preference_accuracy or reward_margin"
            )
        # Checked here, whatever else decides which rules apply (a sweep's recipe, a run's recorded one): no trial
        # or evaluation of this objective reports them.
        objectives = self.objective_metrics(recipe)
        problems += [f"{place}: {m} {objectives[m]}" for place, m in named_metrics(settings) if m in objectives]
        if settings.num_samples > 1 and settings.temperature == 0:
            problems.append("eval.num_samples: several samples per prompt need sampling; set eval.temperature > 0")
        return problems + conversation_problems(recipe)

    # ------------------------------------------------------------ model
    def prepare_model(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: FamilySpec) -> None:
        super().prepare_model(model, tokenizer, family)
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        start = getattr(model.config, "decoder_start_token_id", None)
        shifts_own_start = model.config.model_type in ("mbart", "plbart")  # they start from each target's language
        if family.encoder_decoder and generation is not None and start is not None and not shifts_own_start:
            # Training shifts the labels right from the config's start token and finetune decodes from it; a
            # generation_config.json saying another (a checkpoint without the config's) made the merged model's
            # `generate` elsewhere start from that one, and answer otherwise than the run's metrics said.
            generation.decoder_start_token_id = start

    def reading(self) -> dict[str, Any]:
        return {**super().reading(), "judged": (self.prompt_field, self.answer_field)}

    def fields(self, recipe: Recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Under a preference objective the rows are pairs or thumbs; the task's reference becomes optional.
        Conversations (data.format, or the fields data.columns maps) have their layout's fields."""
        conversation = conversation_fields(recipe.data)
        if conversation is not None:
            return conversation
        required, optional = super().fields(recipe)
        if not recipe.train.learns_from_judgements:
            return required, optional
        wanted, extra = preference_fields(recipe.train.objective, self.prompt_field, self.answer_field)
        rest = [name for name in (*required, *optional) if name not in wanted]
        return wanted, tuple(dict.fromkeys((*extra, *rest)))

    def knows_metric(self, metric: str) -> bool:
        """Also the preference objectives' metrics and, for a task with a reward, GRPO's reward_mean
        (`unavailable_metrics` rules each out under the other objectives)."""
        rewarded = type(self).rewards is not GenerationTask.rewards
        return super().knows_metric(metric) or metric in PREFERENCE_METRICS or (rewarded and metric == REWARD_MEAN)

    def unknown_metric(self, place: str, metric: str) -> str:
        """Also the objectives' own metrics, which the task's list leaves out (a user gating a DPO run read that
        preference_accuracy was no metric of it)."""
        rewarded = type(self).rewards is not GenerationTask.rewards
        return (
            f"{super().unknown_metric(place, metric)}; under train.objective dpo, orpo or kto also "
            f"{', '.join(PREFERENCE_METRICS)}" + (f"; under grpo also {REWARD_MEAN}" if rewarded else "")
        )

    def unavailable_metrics(
        self, recipe: Recipe, asked: Sequence[str] = (), state: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        """Also, of the metrics `asked` outside the recipe (a command-line --gate, a sweep's objective), the
        objectives' own under another objective (`objective_metrics`; those the recipe names, `check_recipe`
        refuses): `eval RUN --gate reward_mean>=0.1` of a DPO run evaluated, then failed as "missing"."""
        objectives = self.objective_metrics(recipe)  # (the objective is why, whatever eval.metrics lists)
        mismatched = {metric: objectives[metric] for metric in asked if metric in objectives}
        return {**super().unavailable_metrics(recipe, asked, state), **mismatched}

    def objective_metrics(self, recipe: Recipe) -> dict[str, str]:
        """The objectives' own metrics this recipe's objective does not report (metric -> why): the one rule
        `check_recipe` (metrics the recipe names) and `unavailable_metrics` (command-line gates) apply."""
        out = {}
        objective = recipe.train.objective
        if not recipe.train.learns_from_judgements:
            out.update(
                dict.fromkeys(
                    PREFERENCE_METRICS, "is reported by the preference objectives (train.objective dpo, orpo, kto)"
                )
            )
        if objective != "grpo":
            out[REWARD_MEAN] = (
                "is reported by train.objective grpo (the mean of the task's reward of each prediction); this "
                f"recipe's objective is {objective}"
            )
        return out

    def conversation_layout(
        self, recipe: Recipe, column_names: Sequence[str], columns: Mapping[str, str], required: Sequence[str]
    ) -> str | None:
        return table_layout(recipe.data, column_names, columns, required)

    def completion_text(self, answer: str) -> str:
        """The text trained on for a reference answer."""
        return answer

    def unreachable_rewards(self, rows: Dataset, recipe: Recipe) -> list[str]:
        """GRPO: notes on training rows whose own reference answer scores below the full reward, so that no sample
        may reach it. None here: a reference scored against itself is the best answer."""
        return []

    def stops(self, settings: EvalSection, chat: bool = False) -> list[str]:
        """Where a generated answer ends: the recipe's `eval.stop`, else the task's defaults. `chat`: the prompt
        went through the chat template or is a conversation (a task whose answers then end elsewhere, e.g.
        codegen's fenced block, overrides this). Callers ask `answer_stops`, which decides `chat`."""
        return list(self.default_stops if settings.stop is None else settings.stop)

    @staticmethod
    def asked_in_chat(data: DataSection, rows: Dataset) -> bool:
        """Whether the prompts of `rows` are asked as chat turns: through the chat template, or as conversations
        (data/conversations.py gives every conversation layout the "messages" column). The one place this is
        decided: evaluation, GRPO's sampler and the watermark detector's generations all end answers by it."""
        return bool(data.chat_template) or "messages" in rows.column_names

    @staticmethod
    def turn_end_ids(tokenizer: PreTrainedTokenizerBase, model_name: str, rows: Dataset) -> list[int]:
        """The chat template's end-of-turn token(s) where `rows` are conversations (none otherwise): a generated
        answer ends there too, in evaluation and in GRPO's sampler alike."""
        if "messages" not in rows.column_names:
            return []
        return ConversationEncoder(tokenizer, "all", model_name).end_of_turn_ids()

    def answer_stops(self, settings: EvalSection, data: DataSection, rows: Dataset) -> list[str]:
        """The stop strings of answers generated for `rows`."""
        return self.stops(settings, chat=self.asked_in_chat(data, rows))

    def fit_state(self, train_rows: Dataset, recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """Whether training asked its prompts as chat turns (`asked_in_chat`, read by `as_trained`)."""
        return {"asked_in_chat": True} if self.asked_in_chat(recipe.data, train_rows) else {}

    def as_trained(self, recipe: Recipe, state: Mapping[str, Any]) -> Recipe:
        """A run that trained on conversations asks every text prompt as it trained, one user turn through the chat
        template: its final evaluation, `finetune eval RUN` and predict alike. Asked raw, a text eval file scored
        prompts the model never trained on, and eval and predict answered the same rows differently. (A run trained
        before the state recorded it asks as its recipe says, as it did.)"""
        if state.get("asked_in_chat") and not recipe.data.chat_template:
            return recipe.model_copy(update={"data": recipe.data.model_copy(update={"chat_template": True})})
        return recipe

    # ------------------------------------------------------------ data
    def featurize(
        self,
        rows: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        recipe: Recipe,
        state: dict[str, Any],
        split: str,
        labeled: bool = True,
        workdir: Path | None = None,
    ) -> Features:
        family = FAMILIES[state["family"]]
        conversations = "messages" in rows.column_names  # data/conversations.py made every layout this column
        if conversations:
            for problem in conversation_problems(recipe, conversations=True):
                raise RecipeError(problem)
        if labeled and recipe.train.learns_from_judgements:  # pairs or thumbs, as text or as conversations
            return featurize_preferences(
                rows, tokenizer, family, recipe, split, self.prompt_field, self.answer_field, self.completion_text
            )
        sampled = labeled and split == "data.train" and recipe.train.objective == "grpo"
        if conversations and sampled:  # each conversation's final assistant turn sampled, rewarded against its own
            features = rollout_conversations(rows, tokenizer, family, recipe, split, self.answer_field)
            features.report.notes.extend(self.unreachable_rewards(features.rows, recipe))
            return features
        if conversations:
            return featurize_conversations(rows, tokenizer, family, recipe, split, labeled, workdir)
        if sampled:
            # GRPO samples its own completions: the training features are the prompts, with each row's index
            # for the reward (the row holds the reference: tests, answers, the reference copy).
            features = rollout_prompts(rows, tokenizer, family, recipe, split, self.prompt_field, self.reward_fields)
            features.report.notes.extend(self.unreachable_rewards(features.rows, recipe))
            return features
        prompts = checked_texts(rows[self.prompt_field][:], split, self.prompt_field, turns_read=True)
        answers = self.answers_of(rows, split, labeled)
        encoded = encode(prompts, answers, tokenizer, family, recipe, split)
        rows = rows.select(encoded.keep) if len(encoded.keep) < len(prompts) else rows
        dataset = (
            encoded.features if encoded.features is not None else Dataset.from_dict({"input_ids": encoded.prompt_ids})
        )
        return Features(dataset, rows, encoded.report, prompts=encoded.prompt_ids)

    def answers_of(self, rows: Dataset, split: str, labeled: bool = True) -> list[str] | None:
        """Text rows' reference answers as supervised training reads them (None: unlabelled, or an eval file
        without them): each one text, and every training row has one (`validate` asks this too)."""
        has_answers = labeled and self.answer_field in rows.column_names
        if split == "data.train" and not has_answers:
            raise DataError(f"{split}: training needs the {self.answer_field!r} field (the text to learn)")
        if not has_answers:
            return None
        return [self.completion_text(a) for a in checked_texts(rows[self.answer_field][:], split, self.answer_field)]

    def collate(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> PadCollator:
        return PadCollator(tokenizer)

    # ------------------------------------------------------------ evaluation
    def predict(
        self,
        model: PeftModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        features: Features,
        accelerator: Accelerator,
        recipe: Recipe,
        state: dict[str, Any],
    ) -> tuple[list[dict], float | None]:
        family = FAMILIES[state["family"]]
        assert features.prompts is not None  # featurize gives a generation task's features their prompts
        loss = None
        if "labels" in features.dataset.column_names:
            loss = completion_loss(model, features.dataset, tokenizer, family, recipe.eval_batch_size, accelerator)
        settings = recipe.eval
        conversations = "messages" in features.rows.column_names
        answers = generate(
            model,
            tokenizer,
            family,
            features.prompts,
            settings,
            self.answer_stops(settings, recipe.data, features.rows),
            decode_batch_size(settings, recipe.eval_batch_size),
            accelerator,
            self.turn_end_ids(tokenizer, recipe.model.name_or_path, features.rows),
        )
        out = []
        for row, samples in zip(features.rows, answers):
            for index, text in enumerate(samples):
                entry = dict(row)
                if settings.num_samples > 1 or self.numbers_samples:
                    entry["sample"] = index
                entry["prediction"] = text
                out.append(entry)
        if conversations and "labels" in features.dataset.column_names:  # evaluation: the final assistant turn
            references(out, self.answer_field)
        return out, loss

    def prediction_fields(self) -> tuple[str, ...]:
        return (self.answer_field, "prediction")

    def prompt_of(self, row: dict) -> str | list[dict[str, str]]:
        """What a training row prompts with, as a user's reward function gets it: a conversation's turns before its
        final assistant turn (as TRL passes a conversational prompt), else the prompt's text."""
        if "messages" in row:
            return row["messages"][: final_turn(row["messages"])]
        return self.text_prompt(row)

    def text_prompt(self, row: dict) -> str:
        return row[self.prompt_field]

    # ------------------------------------------------------------ rewards (train.objective grpo)
    # The fields a row's reward reads (its reference): every training row must hold them.
    reward_fields: tuple[str, ...] = ()

    def rewards(self, rows: list[dict], settings: EvalSection) -> Rewards:
        """Each prediction row's reward: the task's own score of it, in [0, 1] (the metric the gates judge)."""
        raise NotImplementedError(f"task {self.name} has no reward")
