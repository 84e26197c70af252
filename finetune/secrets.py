"""Keep credentials out of everything a run writes or prints.

A value is a secret when it is the value of an environment variable whose name
says so (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...), when it has the
shape of a well-known token, or when it is the password part of a URL. The
resolved recipe, the manifest, checkpoint records, the model card and error
messages all pass through `redact`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

REDACTED = "<redacted>"
# Whole parts of a name, so HF_TOKEN and AWS_SECRET_ACCESS_KEY match but TOKENIZERS_PARALLELISM and tokens_per_s do not.
_SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|API_?KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?|PRIVATE_KEY|ACCESS_KEY)(_|$)", re.IGNORECASE
)
_TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|\bsk-[A-Za-z0-9_-]{20,}"  # OpenAI-style
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
)
_URL_PASSWORD = re.compile(r"(?<=://)([^/\s:@]+):([^/\s@]+)@")
# A watermark key (or a learned watermark's message) typed on a command line, whatever its length:
# `eval.watermark.key=K`, `--key K` / `--key=K` (finetune detect), and `key: K` inside an override's YAML mapping
# (`eval.watermark={method: synthid, key: K}`); the same for `message`, quoted or not (YAML reads 0101 as a number).
_KEY_ARGUMENTS = re.compile(
    r"((?:watermark\.(?:key|message)\s*=\s*|--(?:key|message)[=\s]\s*"
    r"|watermark[^\s=:]*\s*[:=]\s*\{[^}]*?\b(?:key|message)\s*:\s*)['\"]?)([^\s,}'\"]+)"
)
_MIN_LENGTH = 6  # shorter values ("1", "true") would redact ordinary text


# Values this process was told are secret (a watermark key), redacted like the environment's.
_REGISTERED: set[str] = set()


def register_secret(value: str) -> None:
    if len(value) >= 4:  # shorter values would redact ordinary numbers; such keys are weak anyway
        _REGISTERED.add(value)


def environment_secrets() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_LENGTH} | _REGISTERED
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    for value in environment_secrets():
        text = text.replace(value, REDACTED)
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    text = _KEY_ARGUMENTS.sub(rf"\1{REDACTED}", text)
    return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)


class RedactingFilter:
    """A logging filter: records are formatted, then redacted, before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


def _hides(name: str, parent: str, value: Any) -> bool:
    """Whether a value is a secret by its key: a non-empty value of an HF_TOKEN-like name, or a watermark's `key`
    (any number, 0 too; `eval.watermark.key` when flattened) or learned `message`."""
    if name.endswith(("watermark.key", "watermark.message")) or (
        name in ("key", "message") and parent.endswith("watermark")
    ):
        return value is not None
    return bool(_SECRET_NAME.search(name)) and bool(value)


def redact_tree(value: Any, _parent: str = "") -> Any:
    """Redact every string in a JSON-like structure; keys that name a secret (and a watermark's key, a number)
    lose their value."""
    if isinstance(value, dict):
        return {k: REDACTED if _hides(str(k), _parent, v) else redact_tree(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v, _parent) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value
