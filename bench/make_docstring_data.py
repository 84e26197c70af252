"""Prompt -> paragraph data written by people, unlike data/copy: Python's standard-library docstrings.

Each row asks for the documentation of one function or class (its qualified name and signature) and the
completion is its docstring, cut at a sentence end near 100 words. The docstrings are human prose with real
choices in them, so a model fine-tuned on them still has entropy left to watermark (data/copy's templated copy
is memorised token for token, and no watermark can mark text the model would have written anyway). Held-out rows
come from modules never seen in training.

    python bench/make_docstring_data.py bench/.data/docstrings
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

MODULES = [
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "codecs",
    "collections",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "imaplib",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "lzma",
    "mimetypes",
    "mmap",
    "multiprocessing",
    "netrc",
    "numbers",
    "operator",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "stat",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "zipapp",
    "zipfile",
    "zlib",
]
MIN_WORDS, TARGET_WORDS = 50, 100
HELD_OUT_FRACTION = 0.2


def cut_at_sentence(text: str, target_words: int) -> str:
    """The docstring's prose up to the first sentence end past `target_words` words (or all of it)."""
    prose = " ".join(text.split())
    words = prose.split(" ")
    if len(words) <= target_words:
        return prose
    head = " ".join(words[:target_words])
    rest = " ".join(words[target_words:])
    end = re.search(r"[.!?](\s|$)", rest)
    return (head + " " + rest[: end.start() + 1]).strip() if end else prose


def documented(module_name: str):
    """(qualified name, signature, docstring) of the module's public functions and classes with long docstrings."""
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module_name:
            continue
        doc = inspect.getdoc(obj)
        if not doc or len(doc.split()) < MIN_WORDS:
            continue
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            signature = "(...)"
        yield f"{module_name}.{name}", signature, doc


def held_out(module_name: str) -> bool:
    """A stable split by module: the same modules are held out on every machine."""
    digest = int(hashlib.sha256(module_name.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < HELD_OUT_FRACTION


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for module_name in MODULES:
        for qualified, signature, doc in documented(module_name):
            kind = "class" if signature and qualified.split(".")[-1][:1].isupper() else "function"
            row = {
                "brief": f"Write the documentation of the Python {kind} {qualified}{signature}.",
                "copy": cut_at_sentence(doc, TARGET_WORDS),
            }
            splits["test" if held_out(module_name) else "train"].append(row)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{out / (split + '.jsonl')}: {len(rows)} rows", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/.data/docstrings")
