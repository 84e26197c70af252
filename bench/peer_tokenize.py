"""The peer's data path: `datasets.load_dataset("json")` + batched `Dataset.map(tokenizer)`, as the HF course writes it.

    python bench/peer_tokenize.py TRAIN.jsonl EVAL.jsonl MODEL_DIR MAX_LENGTH

Its own cache directory is a fresh temporary one, so each call parses and tokenises from scratch.
"""

import sys
import tempfile

from datasets import load_dataset
from transformers import AutoTokenizer

train, evaluation, model, max_length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(model)
with tempfile.TemporaryDirectory() as cache:
    data = load_dataset("json", data_files={"train": train, "eval": evaluation}, cache_dir=cache)
    data = data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length), batched=True)
    print({split: len(rows) for split, rows in data.items()})
