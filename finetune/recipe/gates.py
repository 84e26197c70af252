"""Quality gates: `metric>=value` conditions checked against metrics.json.

`metric>=value@95` is an interval gate: the bound of the metric's 95% interval on the side the gate faces must
pass (the lower bound for >= and >, the upper for <= and <), so a value that passes by noise alone does not.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from finetune.errors import RecipeError

_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([A-Za-z0-9_@.\-]+?)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*(?:@\s*([0-9.]+)\s*%?)?\s*$")

# metric, level -> its (low, high) interval at that level, or None when it has none
Bounds = Callable[[str, float], "tuple[float, float] | None"]


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float
    level: float | None = None  # an interval gate's confidence level (0.95 for @95); None: the value itself

    def check(self, value: float) -> bool:
        return _OPERATORS[self.op](value, self.threshold)

    @property
    def side(self) -> str:
        """Which bound of the interval an interval gate judges: the one nearest failing."""
        return "low" if self.op in (">=", ">") else "high"

    def can_pass_within(self, low: float, high: float) -> bool:
        """Whether some value in [low, high] passes: a gate `>=1.5` on a fraction never does."""
        t = self.threshold
        return {">=": t <= high, ">": t < high, "<=": t >= low, "<": t > low, "==": low <= t <= high}[self.op]

    def can_fail_within(self, low: float, high: float) -> bool:
        """Whether some value in [low, high] fails: a gate `>=0` on a fraction never does, and guards nothing."""
        t = self.threshold
        return {">=": low < t, ">": low <= t, "<=": high > t, "<": high >= t, "==": not low == t == high}[self.op]

    def __str__(self) -> str:
        level = "" if self.level is None else f"@{_exact(round(self.level * 100, 9))}"
        return f"{self.metric}{self.op}{_exact(self.threshold)}{level}"


def _exact(number: float) -> str:
    """The number as written, every digit kept (`:g` kept six: 0.2187501 was shown, and keyed, as 0.21875)."""
    text = repr(float(number))
    return text.removesuffix(".0")


def parse_gate(text: str) -> Gate:
    match = _GATE.match(text)
    if not match:
        raise RecipeError(
            f"malformed gate {text!r}: expected METRIC>=VALUE, or METRIC>=VALUE@LEVEL to judge the bound of the "
            "metric's LEVEL% interval (operators: >= <= > < ==)"
        )
    metric, op, number, level_text = match.groups()
    try:
        threshold = float(number)
    except ValueError:
        raise RecipeError(f"malformed gate {text!r}: {number!r} is not a number") from None
    if level_text is None:
        return Gate(metric, op, threshold)
    try:
        percent = float(level_text)
    except ValueError:
        raise RecipeError(f"malformed gate {text!r}: level {level_text!r} is not a number") from None
    if not 50 <= percent < 100:
        raise RecipeError(f"gate {text!r}: the level is a percentage from 50 to below 100, e.g. @95")
    if op == "==":
        raise RecipeError(f"gate {text!r}: an interval gate needs >=, >, <= or < (which bound would == judge?)")
    return Gate(metric, op, threshold, percent / 100)


def evaluate_gates(gates: list[Gate], metrics: dict[str, float], bounds: Bounds | None = None) -> dict[str, dict]:
    """One entry per gate: the value, the condition and whether it passed. A missing metric fails.

    An interval gate is judged on its bound (`bounds` gives the metric's interval at the gate's level); it fails
    when the metric has no interval, and its entry records the level, the side and the bound.
    """
    results: dict[str, dict] = {}
    for gate in gates:
        value = metrics.get(gate.metric)
        if gate.level is None:
            passed = value is not None and gate.check(value)
            results[str(gate)] = {"metric": gate.metric, "value": value, "passed": passed}
            continue
        interval = bounds(gate.metric, gate.level) if bounds is not None and value is not None else None
        bound = None if interval is None else interval[0 if gate.side == "low" else 1]
        results[str(gate)] = {
            "metric": gate.metric,
            "value": value,
            "passed": bound is not None and gate.check(bound),
            "level": gate.level,
            "side": gate.side,
            "bound": bound,
            "interval": None if interval is None else list(interval),
        }
    return results
