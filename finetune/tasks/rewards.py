"""GRPO's reward of a sampled completion: the task's own score, plus the recipe's optional terms.

The reward is a weighted sum (`train.grpo.reward`): the task's score (the share of a problem's tests that pass,
F1 against the reference answers, ROUGE-L against the reference copy: the metric the gates judge), a length term,
a pattern term, and a user's own function. The user's function is code finetune did not write, so it is read here
only as text (its module found and parsed, never imported) and called only inside the code sandbox.
"""

from __future__ import annotations

import ast
import importlib.machinery
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import finetune.tasks.sandbox as sandbox
from finetune.errors import RecipeError
from finetune.recipe.schema import EvalSection, RewardSection
from finetune.tasks.generative import GenerationTask, Rewards

log = logging.getLogger(__name__)

# The largest reward a function may give: rewards are float32 tensors whose spread is squared (advantages), and a
# value beyond this overflows there into a "diverged" run. Larger ones count as function_out_of_range, reward 0.
REWARD_LIMIT = 1e15
# What a refusal for the code opt-ins says runs code when a recipe has a reward function.
FUNCTION_RUNS = "train.grpo.reward.function: your reward function runs in the code sandbox"

KEY = "train.grpo.reward.function"


@dataclass(frozen=True)
class UserFunction:
    """A user's reward function as the sandbox runs it: its module's source, file name and function name."""

    source: str
    filename: str
    function: str


def load_reward_function(spec: str) -> UserFunction:
    """`module:function` -> the module's source, found without running it; a refusal (exit 2) naming what is
    wrong when the module cannot be found or read, does not parse, or defines no such function."""
    module, function = spec.rsplit(":", 1)
    path = _module_file(module)
    if path is None:
        raise RecipeError(
            f"{KEY}: cannot find module {module!r} (a .py file, relative to the working directory, or a module on "
            "the Python path)"
        )
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{KEY}: cannot read {path}: {exc}") from None
    except SyntaxError as exc:
        raise RecipeError(f"{KEY}: {path}:{exc.lineno}: not valid Python ({exc.msg})") from None
    if function not in _top_level_names(tree):
        raise RecipeError(f"{KEY}: {path} defines no function {function!r}")
    what = _not_callable(tree).get(function)
    if what is not None:  # calling it fails for every sample: every reward 0, nothing learnt (it trained so)
        raise RecipeError(f"{KEY}: {function!r} in {path} is {what}, not a function")
    return UserFunction(source, path.name, function)


def _module_file(module: str) -> Path | None:
    """The file of `module` (a path ending in .py, or a dotted name), found by the import system's path finder,
    which locates files without executing any package's code."""
    if module.endswith(".py"):
        path = Path(module)
        return path if path.is_file() else None
    search: list[str] | None = [str(Path.cwd()), *sys.path]
    found = None
    for part in module.split("."):
        if search is None:
            return None
        found = importlib.machinery.PathFinder.find_spec(part, search)
        if found is None:
            return None
        search = list(found.submodule_search_locations or []) or None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        return None
    return Path(found.origin)


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


# Values a top-level assignment can bind that are never callable.
_LITERALS = (ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.JoinedStr, ast.ListComp, ast.DictComp)


def _not_callable(tree: ast.Module) -> dict[str, str]:
    """Top-level names whose last binding is surely not a function (name -> what it is): a plain `import` (a
    module) or an assignment of a literal (`score = 5`); a later `def`, class, `from` import or other assignment
    of the name may bind a callable, and wins."""
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update({(a.asname or a.name).split(".")[0]: "a module imported there" for a in node.names})
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in (t for t in targets if isinstance(t, ast.Name)):
                if isinstance(node.value, _LITERALS):
                    found[target.id] = "a value assigned there (a number, text or collection)"
                else:
                    found.pop(target.id, None)
        else:  # a def, a class, a `from` import, or a name bound inside if/try/with/for: may be callable
            for name in _bound_names(node):
                found.pop(name, None)
    return found


def _bound_names(node: ast.AST) -> set[str]:
    """Every name a statement binds, at any depth (a `try: from x import f / except: def f` binds f)."""
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(sub.name)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.add(sub.id)
    return names


class Rewarder:
    """Scores prediction rows (a training row with its sampled `prediction`) as `train.grpo.reward` says."""

    def __init__(self, task: GenerationTask, settings: RewardSection, evaluation: EvalSection):
        self.task, self.settings, self.evaluation = task, settings, evaluation
        self.said: set[str] = set()  # the function's failures already said on the console, by reason
        self.function = load_reward_function(settings.function) if settings.function else None
        if self.function is not None:  # the user's code runs only where generated code may
            sandbox.require_opt_in(evaluation.execute_code, FUNCTION_RUNS)
            sandbox.check_level(evaluation.sandbox)
        self.pattern = re.compile(settings.pattern) if settings.pattern else None

    def __call__(self, rows: list[dict], lengths: list[int]) -> Rewards:
        """One reward per row (`lengths`: each completion's length in tokens) and the reasons, counted."""
        s, total, reasons = self.settings, [0.0] * len(rows), {}
        if s.task:
            scored = self.task.rewards(rows, self.evaluation)
            total = [t + s.task * v for t, v in zip(total, scored.values)]
            reasons.update(scored.reasons)
        if s.length_target is not None:
            target = s.length_target
            total = [t + s.length_weight * max(0.0, 1 - abs(n - target) / target) for t, n in zip(total, lengths)]
        if self.pattern is not None:
            total = [t + s.pattern_weight * bool(self.pattern.search(r["prediction"])) for t, r in zip(total, rows)]
        if self.function is not None:
            values = self._user_rewards(rows, reasons)
            total = [t + s.function_weight * v for t, v in zip(total, values)]
        return Rewards(total, reasons)

    def _user_rewards(self, rows: list[dict], reasons: dict[str, int]) -> list[float]:
        """The user's function on the whole batch in one sandboxed call (TRL's signature: prompts, completions and
        every other field of the rows as keyword lists). A failure is 0 for every row, counted by its reason,
        never an error of the run; so is a value that is not a finite number."""
        assert self.function is not None
        prompt = self.task.prompt_field
        fields = {
            key: [row.get(key) for row in rows]
            for key in rows[0]
            if key not in ("prediction", prompt) and all(_plain(row.get(key)) for row in rows)
        }
        arguments = {
            "prompts": [self.task.prompt_of(row) for row in rows],
            "completions": [row["prediction"] for row in rows],
        }
        limits = sandbox.Limits(timeout_s=self.evaluation.timeout_s, memory_mb=self.evaluation.memory_mb)
        values, outcome = sandbox.run_function(
            self.function.source,
            self.function.filename,
            self.function.function,
            fields | arguments,
            self.evaluation.sandbox,
            limits,
        )
        if values is None or len(values) != len(rows):
            why = outcome.reason if values is None else "wrong_length"
            reasons[f"function_{why}"] = reasons.get(f"function_{why}", 0) + len(rows)
            detail = outcome.detail if values is None else f"{len(values)} values for {len(rows)} completions"
            self._say(why, detail)
            return [0.0] * len(rows)
        missing = sum(v is None for v in values)
        if missing:
            reasons["function_not_a_number"] = reasons.get("function_not_a_number", 0) + missing
            self._say("not_a_number", f"{missing} of {len(rows)} values not a finite number")
        large = sum(v is not None and abs(v) > REWARD_LIMIT for v in values)
        if large:
            reasons["function_out_of_range"] = reasons.get("function_out_of_range", 0) + large
            self._say("out_of_range", f"{large} of {len(rows)} values beyond +-{REWARD_LIMIT:g}")
        return [0.0 if v is None or abs(v) > REWARD_LIMIT else float(v) for v in values]

    def _say(self, reason: str, detail: str) -> None:
        """A failure of the user's function, on the console once per reason: every failed call still counts (the
        reasons in train_log.jsonl), but a function that never works trained on nothing, silently, before."""
        if reason in self.said:
            return
        self.said.add(reason)
        hint = (
            " (only the function's own file goes into the sandbox: a module beside it cannot be imported there)"
            if reason in ("ModuleNotFoundError", "ImportError")
            else ""
        )
        log.warning(
            "train.grpo.reward.function %s: %s; its term is 0 for those completions%s",
            self.settings.function,
            detail.strip().splitlines()[-1][:300] if detail.strip() else reason,
            hint,
        )


def _plain(value: object) -> bool:
    """A value JSON carries as it is (what a reward function's keyword lists may hold)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False
