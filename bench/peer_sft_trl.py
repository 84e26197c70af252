"""The generative peer: what a user would otherwise write. TRL's SFTTrainer with a peft LoRA config.

As TRL's SFT documentation writes it: a prompt-completion dataset (conversational when the recipe sends prompts
through the chat template), an `SFTConfig`, a `LoraConfig` on all linear layers, `SFTTrainer(model=<path>, ...)`
and `trainer.train()`; TRL's defaults otherwise (completion-only loss, bf16 autocast where it is supported,
dynamic padding). Hyper-parameters are read from the same finetune recipe: model, data, max_length, LoRA rank,
alpha and dropout, epochs, batch size, learning rate, schedule, warmup, seed.

    python bench/peer_sft_trl.py RECIPE [KEY=VALUE ...]   -> one JSON line on stdout
"""

import json
import os
import sys
import tempfile
import time

START = time.perf_counter()

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from finetune.flows.resolve import load_recipe  # noqa: E402  (only to read the same settings)
from finetune.models.references import resolve_reference  # noqa: E402


def prompt_completion(row: dict, columns: dict, task: str, conversational: bool) -> dict:
    """A row as TRL's prompt-completion format: the text finetune's task trains on for that row."""
    if task == "qa":  # generative QA: finetune's prompt layout, the answer after a space
        context = row.get(columns.get("context", "context"))
        question = row[columns.get("question", "question")]
        prompt = f"Context: {context}\nQuestion: {question}\nAnswer:" if context else f"Question: {question}\nAnswer:"
        completion = " " + row[columns.get("answer", "answer")].strip()
    else:
        prompt, completion = row[columns.get("prompt", "prompt")], row[columns.get("completion", "completion")]
    if conversational:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}],
        }
    return {"prompt": prompt, "completion": completion}


FP32 = os.environ.get("PEER_PRECISION") == "fp32"


def main() -> None:
    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    columns = dict(recipe.data.columns)
    raw = load_dataset("json", data_files=recipe.data.train, split="train")
    dataset = raw.map(
        lambda row: prompt_completion(row, columns, recipe.task, recipe.data.chat_template),
        remove_columns=raw.column_names,
    )

    t, lora = recipe.train, recipe.lora
    with tempfile.TemporaryDirectory() as output_dir:
        args = SFTConfig(
            output_dir=output_dir,
            max_length=recipe.data.max_length,
            per_device_train_batch_size=t.batch_size,
            num_train_epochs=t.epochs,
            learning_rate=t.lr,
            lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup,  # a fraction below 1, as finetune's warmup
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm or 0.0,
            seed=t.seed,
            save_strategy="no",
            report_to=[],
            logging_steps=10,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            # PEER_PRECISION=fp32: TRL told to train in float32, as a user would on a CPU without native bf16, where
            # its default (bf16 autocast) runs every matmul emulated (0.6 GFLOP/s against 65 in fp32 on an AVX2-only
            # EPYC). Unset: TRL's own default, as its documentation writes it.
            **({"bf16": False, "model_init_kwargs": {"dtype": torch.float32}} if FP32 else {}),
        )
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=resolve_reference(recipe.model.name_or_path),
            args=args,
            train_dataset=dataset,
            peft_config=peft_config,
        )
        output = trainer.train()
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    tokens = sum(lengths) * t.epochs
    seconds = output.metrics["train_runtime"]
    print(
        json.dumps(
            {
                "train_seconds": seconds,
                "train_tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "final_loss": output.training_loss,
                "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
                "process_seconds": time.perf_counter() - START,
            }
        )
    )


if __name__ == "__main__":
    main()
