"""The peer: what a user would otherwise write. Hugging Face Trainer + DataCollatorWithPadding + peft LoRA.

This follows the Hugging Face course / peft sequence-classification guide:
tokenize with truncation, pad per batch with DataCollatorWithPadding, wrap the
model with a LoRA config, train with Trainer evaluating once per epoch, report
accuracy. Hyper-parameters are read from the same finetune recipe, so both
contenders train the same model on the same data with the same settings.

    python bench/peer_trainer.py RECIPE [KEY=VALUE ...]   -> one JSON line on stdout
"""

import json
import sys
import tempfile
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from finetune.flows.resolve import load_recipe  # noqa: E402  (only to read the same settings)
from finetune.models.references import resolve_reference  # noqa: E402


def main() -> None:
    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    text_col = recipe.data.columns.get("text", "text")
    label_col = recipe.data.columns.get("label", "label")
    files = {"train": recipe.data.train, "test": recipe.data.eval}
    raw = load_dataset("json", data_files=files)
    labels = sorted(set(raw["train"][label_col]))
    label2id = {label: i for i, label in enumerate(labels)}

    path = resolve_reference(recipe.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def preprocess(batch):
        encoded = tokenizer(batch[text_col], truncation=True, max_length=recipe.data.max_length)
        encoded["labels"] = [label2id[label] for label in batch[label_col]]
        return encoded

    tokenized = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules="all-linear",
    )
    model = get_peft_model(model, lora)

    def accuracy(prediction):
        logits, gold = prediction
        return {"accuracy": float((np.argmax(logits, axis=-1) == gold).mean())}

    t = recipe.train
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            learning_rate=t.lr,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            num_train_epochs=t.epochs,
            weight_decay=t.weight_decay,
            warmup_steps=t.warmup,
            lr_scheduler_type=t.scheduler,
            max_grad_norm=t.max_grad_norm or 0.0,
            eval_strategy="epoch",
            save_strategy="epoch",
            load_best_model_at_end=True,
            seed=t.seed,
            report_to=[],
            logging_steps=50,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized["test"],
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
        )
        train_output = trainer.train()
        evaluation = trainer.evaluate()
    real_tokens = sum(len(ids) for ids in tokenized["train"]["input_ids"]) * t.epochs
    print(
        json.dumps(
            {
                "accuracy": evaluation["eval_accuracy"],
                "train_seconds": train_output.metrics["train_runtime"],
                "train_tokens": real_tokens,
                "tokens_per_s": real_tokens / train_output.metrics["train_runtime"],
                "process_seconds": time.perf_counter() - START,
            }
        )
    )


if __name__ == "__main__":
    main()
