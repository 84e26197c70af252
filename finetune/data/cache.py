"""Tokenised features cached on disk by the content they come from, so a second run, an `eval`, a `--dry-run`
followed by `run`, or a resume does not read and tokenise the data again.

An entry is keyed by the SHA-256 of every data file, the tokenizer (its full serialised form and special
tokens), and every setting that shapes features: the task, the whole `data` section, the seed (it draws
`eval_split`), the family, the splits and, for `eval`/`predict`, the adapter's task state. It lives under
`$FINETUNE_CACHE/features/<key>/`:

    <split>-rows-*.arrow, <split>-features-*.arrow   Arrow files, memory-mapped when read back
    extras.pkl      length reports, prompt ids, QA windows, task state, overlap (what is not a table)
    manifest.json   SHA-256 of every file above; written last

It is built in a temporary sibling directory and renamed into place, so a reader never sees half an entry,
and every file is checked against the manifest before use: a damaged entry is removed and rebuilt, never
trusted. Data that is not a set of local files (a hub dataset) or that depends on a retriever (a knowledge
base) is not cached.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, concatenate_datasets

from finetune import __version__
from finetune.data.features import Features
from finetune.data.tables import content_hash, local_data_path
from finetune.files import sha256_file
from finetune.models.references import cache_root, cache_unwritable
from finetune.recipe.schema import Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("finetune")

# Bump when what featurize writes changes in a way the key does not see.
# 2: the package's layers (extras.pkl names classes by their module path).
FORMAT = 2


@dataclass
class CachedData:
    """What reading and tokenising the data produced: the part of a SessionData that does not need the tokenizer."""

    features: dict[str, Features]
    state: dict[str, Any]
    overlap: dict[str, Any]


def cache_key(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, family: str, splits: tuple[str, ...], adapter_state: dict | None
) -> str | None:
    """The entry's name, or None when the data cannot be keyed by content."""
    data = recipe.data
    if data.knowledge_base is not None:
        return None
    files = {}
    for key in ("train", "eval"):
        spec = getattr(data, key)
        for item in [] if spec is None else [spec] if isinstance(spec, str) else spec:
            path = local_data_path(item, f"data.{key}")
            if not path.is_file():
                return None  # a hub dataset: no content hash to key by
            files[item] = content_hash(path)
    parts = {
        "format": FORMAT,
        "finetune": __version__,
        "code": reading_code_hash(),
        "task": recipe.task,
        "objective": recipe.train.objective,  # pairs and thumbs are featurised unlike supervised rows
        "data": data.model_dump(mode="json"),
        "seed": recipe.train.seed,
        "family": family,
        "splits": list(splits),
        "files": files,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "adapter_state": adapter_state,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# The packages whose code decides what rows are read and how they become features: a change there (a fix to how a
# CSV label is read, a row check inside featurisation) must miss the cache, version number or not; an entry from
# before served the old features and skipped the new checks on an editable install.
READING_CODE = ("data", "tasks", "recipe")


@functools.cache
def reading_code_hash() -> str:
    """SHA-256 over the source of READING_CODE and the versions of the libraries that parse the files."""
    from importlib import metadata

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in READING_CODE:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(f"{path.relative_to(root)}\0{sha256_file(path)}\n".encode())
    for library in ("datasets", "pyarrow", "pandas"):
        digest.update(f"{library} {metadata.version(library)}\n".encode())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything about a tokenizer that changes token ids: its serialised pipeline, special tokens, templates."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for value in (
        tokenizer.all_special_tokens,
        tokenizer.padding_side,
        tokenizer.truncation_side,
        getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    ):
        digest.update(repr(value).encode())
    return digest.hexdigest()


class FeatureCache:
    """Where one key's entry lives; `load` a verified entry, or `build` one in a work directory and `publish` it."""

    def __init__(self, key: str | None, root: Path | None = None):
        self.key = key
        self.root = (root or cache_root()) / "features"
        self.entry = self.root / key if key else None
        self.note = ""  # what happened, for the plan: "reused ..." / "damaged ... rebuilt"
        self._building: int | None = None  # the lock held on the build's work directory

    def load(self) -> CachedData | None:
        if self.entry is None or not self.entry.is_dir():
            return None
        try:
            manifest = json.loads((self.entry / "manifest.json").read_text())
            for name, digest in manifest["files"].items():
                if sha256_file(self.entry / name) != digest:
                    raise ValueError(f"{name} does not match its checksum")
            with open(self.entry / "extras.pkl", "rb") as handle:
                extras = pickle.load(handle)
            loaded = self._reopen(self.entry, manifest, extras)
        # AttributeError/ImportError: extras.pkl names a class another finetune version kept elsewhere.
        except (OSError, ValueError, KeyError, EOFError, AttributeError, ImportError, pickle.UnpicklingError) as exc:
            log.warning("feature cache entry %s was damaged (%s); rebuilding it", self.entry, exc)
            self.note = f"entry {self.key} was damaged ({exc}); rebuilt"
            _remove(self.entry)
            return None
        self.note = f"reused tokenised features (entry {self.key})"
        return loaded

    def workdir(self) -> Path:
        """A fresh directory to build in: beside the entry (so publishing is a rename), or a temporary one. Held
        by a lock file beside it while it is built, so the builds of processes that died (kill -9, a full disk)
        are told from live ones, on any host or container sharing the cache, and removed here."""
        if self.entry is not None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                _remove_abandoned_builds(self.root)
                workdir = Path(tempfile.mkdtemp(prefix=f".{self.key}.", dir=self.root))
                self._building = _hold(workdir.with_name(workdir.name + _BUILDING))
                return workdir
            except OSError as exc:
                cache_unwritable("feature", self.root, exc, "features are not cached")
                self.entry = None
        # Not cached: the tables still go to disk (memory-mapped, not held in memory), removed when the process ends.
        scratch = tempfile.mkdtemp(prefix="finetune-features-")
        atexit.register(shutil.rmtree, scratch, True)
        return Path(scratch)

    def discard(self, workdir: Path) -> None:
        """A build that failed: its work directory goes (a scratch one goes when the process ends anyway)."""
        if self.entry is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        self._release(workdir)

    def _release(self, workdir: Path) -> None:
        if self._building is not None:
            workdir.with_name(workdir.name + _BUILDING).unlink(missing_ok=True)
            os.close(self._building)  # the lock goes with it
            self._building = None

    def publish(self, workdir: Path, built: CachedData) -> CachedData:
        """Write the entry's tables, extras and manifest into `workdir`, then move it into place."""
        splits, extras = {}, {"state": built.state, "overlap": built.overlap, "features": {}}
        for split, features in built.features.items():
            splits[split] = {
                "rows": _table_files(features.rows, workdir, f"{split}-rows"),
                "features": _table_files(features.dataset, workdir, f"{split}-features"),
            }
            extras["features"][split] = {
                "report": features.report,
                "prompts": features.prompts,
                "windows": features.windows,
            }
        with open(workdir / "extras.pkl", "wb") as handle:
            pickle.dump(extras, handle, protocol=pickle.HIGHEST_PROTOCOL)
        files = sorted(p.name for p in workdir.iterdir())
        manifest = {"format": FORMAT, "splits": splits, "files": {name: sha256_file(workdir / name) for name in files}}
        (workdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if self.entry is None:
            return self._reopen(workdir, manifest, extras)
        try:
            os.rename(workdir, self.entry)
        except OSError:  # another process published the same entry first: use theirs, drop ours
            shutil.rmtree(workdir, ignore_errors=True)
            return self.load() or built
        finally:
            self._release(workdir)
        self.note = self.note or f"tokenised features cached (entry {self.key})"  # a damaged entry's says "rebuilt"
        return self._reopen(self.entry, manifest, extras)

    @staticmethod
    def _reopen(directory: Path, manifest: dict, extras: dict) -> CachedData:
        """The published tables memory-mapped, so cold and warm runs train on the same kind of object."""
        features = {
            split: Features(
                _open(directory, files["features"]), _open(directory, files["rows"]), **extras["features"][split]
            )
            for split, files in manifest["splits"].items()
        }
        return CachedData(features, extras["state"], extras["overlap"])


# Beside each work directory being built: a file its builder holds locked (flock) until it publishes or fails.
_BUILDING = ".building"


def _hold(path: Path) -> int:
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def _remove_abandoned_builds(root: Path) -> None:
    """Work directories whose builder is gone (killed while building): never published, never reused, as large as
    the features. The kernel releases a dead process's lock, so taking it tells a dead build from a live one, in
    another container or on another host sharing the cache as well."""
    for lock in root.glob(f".*{_BUILDING}"):
        try:
            descriptor = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # its build just finished
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live build
            continue
        finally:
            os.close(descriptor)
        shutil.rmtree(lock.with_name(lock.name.removesuffix(_BUILDING)), ignore_errors=True)
        lock.unlink(missing_ok=True)


def _table_files(dataset: Dataset, workdir: Path, name: str) -> list[str]:
    """The Arrow files that hold `dataset` inside `workdir`, writing it there unless it already is (unselected)."""
    files = [Path(f["filename"]) for f in dataset.cache_files]
    # Kept only where the dataset is those files whole: `select` of a contiguous range (rows left out from the start
    # or the end) gives no index mapping but a slice of the same file, which written back would bring them again.
    if (
        dataset._indices is None
        and files
        and all(f.parent == workdir for f in files)
        and sum(Dataset.from_file(str(f)).num_rows for f in files) == dataset.num_rows
    ):
        return [f.name for f in files]
    # A name of its own: `datasets` would load an existing file of that name (e.g. the unselected rows) as a cache.
    target = workdir / f"{name}-written.arrow"
    if target.exists():
        raise FileExistsError(target)
    dataset.flatten_indices(cache_file_name=str(target), keep_in_memory=False)
    return [target.name]


def _open(directory: Path, files: list[str]) -> Dataset:
    parts = [Dataset.from_file(str(directory / name)) for name in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _remove(path: Path) -> None:
    """Take a damaged entry out of the way first (a rename is atomic), then delete it."""
    trash = path.with_name(f".{path.name}.damaged-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)
