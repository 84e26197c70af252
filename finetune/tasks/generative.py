"""What every text-generation task shares: causal-LM or seq2seq models, completion-only loss, generation.

A subclass names its prompt and answer fields, its metrics and its default
stop strings; featurize/collate/predict come from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.data.features import Features
from finetune.data.tables import checked_texts
from finetune.errors import DataError
from finetune.models.families import FAMILIES, FamilySpec
from finetune.recipe.schema import EvalSection, Recipe
from finetune.tasks.base import Task
from finetune.tasks.text2text import PadCollator, completion_loss, encode, generate

if TYPE_CHECKING:
    from peft import PeftModel


class GenerationTask(Task):
    prompt_field = "prompt"
    answer_field = "completion"  # the reference text, trained on and compared with
    default_stops: tuple[str, ...] = ()
    uses_template = True
    head = "generation"

    def check_recipe(self, recipe: Recipe) -> list[str]:
        problems = super().check_recipe(recipe)
        settings = recipe.eval
        if settings.num_samples > 1 and settings.temperature == 0:
            problems.append("eval.num_samples: several samples per prompt need sampling; set eval.temperature > 0")
        return problems

    # ------------------------------------------------------------ model
    def prepare_model(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: FamilySpec) -> None:
        super().prepare_model(model, tokenizer, family)
        if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id

    def completion_text(self, answer: str) -> str:
        """The text trained on for a reference answer."""
        return answer

    def stops(self, settings: EvalSection) -> list[str]:
        return list(self.default_stops if settings.stop is None else settings.stop)

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
        prompts = checked_texts(rows[self.prompt_field][:], split, self.prompt_field)
        has_answers = labeled and self.answer_field in rows.column_names
        if split == "data.train" and not has_answers:
            raise DataError(f"{split}: training needs the {self.answer_field!r} field (the text to learn)")
        answers = None
        if has_answers:
            answers = [
                self.completion_text(a) for a in checked_texts(rows[self.answer_field][:], split, self.answer_field)
            ]
        family = FAMILIES[state["family"]]
        encoded = encode(prompts, answers, tokenizer, family, recipe, split)
        rows = rows.select(encoded.keep) if len(encoded.keep) < len(prompts) else rows
        dataset = (
            encoded.features if encoded.features is not None else Dataset.from_dict({"input_ids": encoded.prompt_ids})
        )
        return Features(dataset, rows, encoded.report, prompts=encoded.prompt_ids)

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
        answers = generate(
            model,
            tokenizer,
            family,
            features.prompts,
            settings,
            self.stops(settings),
            recipe.eval_batch_size,
            accelerator,
        )
        out = []
        for row, samples in zip(features.rows, answers):
            for index, text in enumerate(samples):
                entry = dict(row)
                if settings.num_samples > 1:
                    entry["sample"] = index
                entry["prediction"] = text
                out.append(entry)
        return out, loss

    def prediction_fields(self) -> tuple[str, ...]:
        return (self.answer_field, "prediction")
