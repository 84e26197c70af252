"""Quality gates: `metric>=value` conditions checked against metrics.json."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from finetune.errors import RecipeError

_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([A-Za-z0-9_@.\-]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def check(self, value: float) -> bool:
        return _OPERATORS[self.op](value, self.threshold)

    def can_pass_within(self, low: float, high: float) -> bool:
        """Whether some value in [low, high] passes: a gate `>=1.5` on a fraction never does."""
        t = self.threshold
        return {">=": t <= high, ">": t < high, "<=": t >= low, "<": t > low, "==": low <= t <= high}[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_gate(text: str) -> Gate:
    match = _GATE.match(text)
    if not match:
        raise RecipeError(f"malformed gate {text!r}: expected METRIC>=VALUE (operators: >= <= > < ==)")
    metric, op, number = match.groups()
    try:
        return Gate(metric, op, float(number))
    except ValueError:
        raise RecipeError(f"malformed gate {text!r}: {number!r} is not a number") from None


def evaluate_gates(gates: list[Gate], metrics: dict[str, float]) -> dict[str, dict]:
    """One entry per gate: the value, the condition and whether it passed. A missing metric fails."""
    results = {}
    for gate in gates:
        value = metrics.get(gate.metric)
        passed = value is not None and gate.check(value)
        results[str(gate)] = {"metric": gate.metric, "value": value, "passed": passed}
    return results
