"""Is a difference between two models real? Paired bootstrap over MLQA instances, the authors'
Wilcoxon test done right, and seed summaries (issue 11). Pure numpy + scipy.

The question. Two models A and B were evaluated on the same examples; the tables report a
difference of means, e.g. G-XLT F1 = the unweighted mean over the 49 MLQA (question language,
context language) pairs of each pair's mean F1. Is B - A larger than what another draw of test
examples would give?

The method: a paired bootstrap over resampling units. A cell (one MLQA pair, one XQuAD
language, ...) holds per-example scores of A and B on the same examples, and every example names
its unit. For MLQA the unit is the instance: its question id, which the instance keeps in every
one of the up to 49 pair files it appears in (the same question and context, translated). One
resample draws the distinct units of all cells together, with replacement, as many as there are;
a drawn unit brings all its examples in every cell, so its weight is the number of times it was
drawn. A cell's resampled statistic is the weighted mean of B - A over its examples; an
aggregate's is the unweighted mean of its cells' statistics, exactly as the paper averages. The
percentile interval of the resampled statistics is the confidence interval, and the two-sided
p-value is read off the same percentile distribution (one construction, so "p < 0.05" if and
only if "the 95% interval excludes 0", and the heat maps' dots agree with both): p is the
smallest a at which the (1 - a) percentile interval excludes 0,

    p = 2 * min(u_low, 1 - u_high),   u_low = max{u : Q(u) <= 0},  u_high = min{u : Q(u) >= 0}

for Q the quantile function of the resamples (np.quantile's linear interpolation), i.e. about
twice the share of resamples on the far side of 0. Identical predictions give d = 0, p = 1 and
the interval [0, 0]. p is floored at 1 / n_resamples, the bootstrap's resolution (printed as
"< 1e-4" for 10,000 resamples). (Until issue 16, p came from the null-centred bootstrap,
|d* - d| >= |d|, a symmetric construction that disagreed with the percentile interval in 0.4-2.7%
of comparisons near the 5% boundary.)

Why resample instances and not examples. An instance's 49 pairs share their question and context
(in translation) and their answer, so a model that gets it right in one pair tends to get it right
in the others: the pairs are positively correlated. Resampling examples independently per pair
would treat the ~160,000 examples of MLQA-test's 49 pair files as independent draws, while the
test set holds only ~11,600 instances (~41,000 examples are in the 7 same-language files; an
instance with k languages appears in k^2 pair files, k ~ 3.6 on average); intervals of G-XLT
would come out too narrow and p-values too small. Drawing instances keeps every correlation
between pairs, and the aggregate's interval follows.

Why not the authors' Wilcoxon test. Their (unpublished) test runs scipy's Wilcoxon signed-rank
test on the per-example F1 differences pooled over pairs. It (a) treats the examples of all
pairs as independent, which they are not (above), so its p-values are typically too small; (b)
tests whether the per-example differences are symmetric around zero (a median-type shift; with
scipy's default zero_method the many examples where both models agree are dropped), not whether
the difference of pair means that the tables report is zero; and (c) in the authors' script the
"XLT" selection (same-language pairs) was applied after the scores were pooled, so its XLT
p-values came from all pairs. `wilcoxon_p` is that test done right as far as it can be: the
caller selects the XLT examples before calling it. It is reported for comparability; the
bootstrap is the one to trust.

No correction for multiple comparisons is made: the 49 per-pair p-values are each a test of
their own pair; about 1 in 20 pairs with no real difference will show p < 0.05.

The computation is vectorised: per-(unit, cell) sums of B - A and example counts form a matrix
[units, 2 * cells]; a chunk of resamples is a matrix of draw counts [chunk, units] (from
`rng.integers` and one offset `np.bincount`), and one matrix product gives every cell's weighted
sums for the chunk. MLQA-test size (49 cells, ~160k examples, ~11.6k units, 10,000 resamples)
takes a few seconds. Results are deterministic for a seed (and a given numpy version and chunk
size).
"""
import math
import numbers
import warnings

import numpy as np

from common import InputError, not_a_script

N_RESAMPLES = 10_000        # bootstrap resamples; the p-value's resolution is 1 / N
MAX_RESAMPLES = 1_000_000   # --bootstrap's limit: the resamples are drawn as one array
CONFIDENCE = 0.95           # two-sided percentile interval
SEED = 0                    # np.random.default_rng seed; results are reproducible for a seed
CHUNK_ELEMENTS = 8_000_000  # resamples x units per chunk: 64 MB per [chunk, units] int64 or
                            # float64 array, at most two alive at once: peak memory < ~300 MB
TIE_TOLERANCE = 1e-9        # score units (0..100): resampled differences this close to 0 are
                            # 0 (rounding must not put them on either side)
WILCOXON_ZERO_METHOD = "wilcox"  # scipy's default (drop zero differences), as the authors ran it


# ----------------------------------------------------------------------------------------------
# Input checks and the (unit, cell) sums


def _check_resamples(n_resamples):
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, numbers.Integral) \
            or n_resamples < 1:
        raise InputError(f"the number of bootstrap resamples must be an integer >= 1, "
                         f"got {n_resamples!r}")


def _check_confidence(confidence):
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) \
            or not 0 < confidence < 1:
        raise InputError(f"the confidence level must lie strictly between 0 and 1, "
                         f"got {confidence!r}")


def _scores(values, what):
    """A 1-d float array of finite scores, or InputError naming `what`."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{what}: scores must be numbers") from None
    if array.ndim != 1:
        raise InputError(f"{what}: scores must be a flat sequence, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what}: scores must be finite numbers (found NaN or infinity)")
    return array


def _check_cells(cells):
    """Validate `cells`; returns {name: (unit_ids list, differences B - A, mean A, mean B)}."""
    if not isinstance(cells, dict) or not cells:
        raise InputError("no cells to compare (expected {cell: (unit_ids, scores_a, scores_b)})")
    checked = {}
    for name, cell in cells.items():
        if not isinstance(cell, (tuple, list)) or len(cell) != 3:
            raise InputError(f"cell '{name}': expected (unit_ids, scores_a, scores_b)")
        units, a, b = list(cell[0]), _scores(cell[1], f"cell '{name}'"), \
            _scores(cell[2], f"cell '{name}'")
        if not (len(units) == len(a) == len(b)):
            raise InputError(f"cell '{name}': lengths differ ({len(units)} unit ids, "
                             f"{len(a)} scores of A, {len(b)} scores of B)")
        if not units:
            raise InputError(f"cell '{name}': no examples")
        checked[name] = (units, b - a, float(a.mean()), float(b.mean()))
    return checked


def _check_aggregates(aggregates, cell_names):
    aggregates = {} if aggregates is None else aggregates
    if not isinstance(aggregates, dict):
        raise InputError("aggregates must be a dict {name: [cell names]}")
    for name, members in aggregates.items():
        if name in cell_names:
            raise InputError(f"aggregate '{name}' has the name of a cell")
        members = list(members)
        if not members:
            raise InputError(f"aggregate '{name}': no cells")
        unknown = [m for m in members if m not in cell_names]
        if unknown:
            raise InputError(f"aggregate '{name}': unknown cell '{unknown[0]}'")
        if len(set(members)) != len(members):
            raise InputError(f"aggregate '{name}': a cell is listed twice")
    return {name: list(members) for name, members in aggregates.items()}


def _unit_order(checked):
    """The distinct units of all cells in a fixed order (sorted when the ids can be sorted), so
    that a unit's index, and hence the resamples, do not depend on the order of the cells."""
    try:
        distinct = dict.fromkeys(u for units, *_ in checked.values() for u in units)
    except TypeError as e:
        raise InputError(f"unit ids must be hashable (strings, numbers): {e}") from None
    try:
        return sorted(distinct)
    except TypeError:  # ids of mixed types: first appearance
        return list(distinct)


def _unit_sums(checked, units):
    """sums [units, cells] of B - A per (unit, cell), counts [units, cells] of examples."""
    index = {u: i for i, u in enumerate(units)}
    sums = np.zeros((len(units), len(checked)))
    counts = np.zeros((len(units), len(checked)))
    for c, (cell_units, diff, _, _) in enumerate(checked.values()):
        rows = np.fromiter((index[u] for u in cell_units), dtype=np.int64, count=len(cell_units))
        sums[:, c] = np.bincount(rows, weights=diff, minlength=len(units))
        counts[:, c] = np.bincount(rows, minlength=len(units))
    return sums, counts


# ----------------------------------------------------------------------------------------------
# The bootstrap


def _draw_counts(rng, n_units, n_rows):
    """[n_rows, n_units] float counts: each row draws n_units units with replacement."""
    draws = rng.integers(0, n_units, size=(n_rows, n_units))
    draws += np.arange(n_rows)[:, None] * n_units  # row r's draws land in [r*U, (r+1)*U)
    counts = np.bincount(draws.ravel(), minlength=n_rows * n_units)
    del draws
    return counts.reshape(n_rows, n_units).astype(float)


def _aggregate(cell_values, members):
    """Unweighted mean over an aggregate's cells, ignoring NaN cells; NaN when all are NaN.

    cell_values: [..., cells]; members: column indices."""
    part = cell_values[..., members]
    finite = np.isfinite(part)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, part, 0.0).sum(-1) / finite.sum(-1)


def resample_differences(cells, aggregates=None, n_resamples=N_RESAMPLES, seed=SEED):
    """The bootstrap distribution behind `bootstrap_differences` (same arguments).

    Returns (observed, resampled): observed {name: B - A} and resampled {name: float array
    [n_resamples]} for every cell, then every aggregate. A resampled value is NaN when the cell
    (or every cell of the aggregate) got no weight in that resample.
    """
    _check_resamples(n_resamples)
    checked = _check_cells(cells)
    return _resample(checked, _check_aggregates(aggregates, checked), n_resamples, seed)


def _resample(checked, aggregates, n_resamples, seed):
    names = list(checked)
    column = {name: c for c, name in enumerate(names)}
    units = _unit_order(checked)
    sums, counts = _unit_sums(checked, units)
    both = np.concatenate([sums, counts], axis=1)  # one matrix product gives both: [U, 2C]

    n_units, n_cells = len(units), len(names)
    chunk = max(1, min(n_resamples, CHUNK_ELEMENTS // n_units))
    rng = np.random.default_rng(seed)
    cell_stats = np.empty((n_resamples, n_cells))
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        weighted = _draw_counts(rng, n_units, rows) @ both  # [rows, 2C]
        with np.errstate(invalid="ignore", divide="ignore"):  # a cell without weight: NaN
            cell_stats[start:start + rows] = weighted[:, :n_cells] / weighted[:, n_cells:]

    # The observed difference is the mean of B - A (the all-ones weights).
    observed_cells = np.array([checked[name][1].mean() for name in names])
    observed = {name: float(observed_cells[c]) for c, name in enumerate(names)}
    resampled = {name: cell_stats[:, c] for c, name in enumerate(names)}
    for name, members in aggregates.items():
        idx = [column[m] for m in members]
        observed[name] = float(observed_cells[idx].mean())
        resampled[name] = _aggregate(cell_stats, idx)
    return observed, resampled


def _percentile_p(sorted_values):
    """Two-sided p of the percentile interval: the infimum of the levels a at which the
    (1 - a) interval [Q(a/2), Q(1 - a/2)] excludes 0, for Q = np.quantile's default (linear)
    interpolation of the sorted resamples. Q is continuous and non-decreasing, so the interval
    excludes 0 exactly when a/2 > min(u_low, 1 - u_high), with u_low the largest u where
    Q(u) <= 0 and u_high the smallest u where Q(u) >= 0: p = 2 * min(u_low, 1 - u_high),
    clipped to [0, 1]. Hence p < a if and only if the (1 - a) interval excludes 0."""
    x, n = sorted_values, len(sorted_values)

    def crossing(k):  # the h in [k-1, k] where the line from x[k-1] < ... to x[k] reaches 0
        return (k - 1) + (-x[k - 1]) / (x[k] - x[k - 1])

    at_most = int(np.searchsorted(x, 0.0, side="right"))   # values <= 0
    below = int(np.searchsorted(x, 0.0, side="left"))      # values < 0
    if at_most == 0 or below == n:         # every resample on one side of 0: no level includes 0
        return 0.0
    u_low = 1.0 if at_most == n else crossing(at_most) / (n - 1)
    u_high = 0.0 if below == 0 else crossing(below) / (n - 1)
    return float(min(1.0, 2 * min(u_low, 1 - u_high)))


def _interval_and_p(resampled, confidence):
    """Percentile interval and its two-sided p (one construction, see _percentile_p), ignoring
    NaN resamples. p is floored at 1/N for N resamples, the resolution of the bootstrap (the
    report prints "< 1/N" there); p < 1 - confidence exactly when the interval excludes 0, for
    any confidence whose 1 - confidence exceeds 1/N."""
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return [math.nan, math.nan], math.nan
    # Differences that should be exactly 0 can come out as +-1e-14 after the weighted means:
    # rounding must decide neither the interval's side of 0 nor p.
    finite = np.sort(np.where(np.abs(finite) <= TIE_TOLERANCE, 0.0, finite))
    tail = (1 - confidence) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    p = max(_percentile_p(finite), 1 / finite.size)
    return [float(low), float(high)], float(p)


def bootstrap_differences(cells, aggregates=None, n_resamples=N_RESAMPLES, seed=SEED,
                          confidence=CONFIDENCE):
    """Paired bootstrap of B - A over resampling units, jointly for all cells.

    cells: {cell name: (unit_ids, scores_a, scores_b)}, one entry per example (scores 0..100).
    aggregates: {aggregate name: [cell names]}: the unweighted mean of those cells' means
        (G-XLT: all 49 MLQA pairs; XLT: the 7 same-language pairs).
    Returns {name: {"diff", "ci": [low, high], "p", "n", "units", "mean_a", "mean_b"}} for every
    cell, then every aggregate: diff = observed mean_b - mean_a; ci the percentile interval at
    `confidence`; p the two-sided p of that percentile construction (p < 1 - confidence iff the
    interval excludes 0; floored at 1/resamples); resamples the resamples in which the cell (or
    aggregate) got weight; n the number of examples; units
    the number of distinct units (for an aggregate: over its cells; mean_a/mean_b are then the
    unweighted means of its cells' means, like diff).
    """
    _check_resamples(n_resamples)
    _check_confidence(confidence)
    checked = _check_cells(cells)
    aggregates = _check_aggregates(aggregates, checked)
    observed, resampled = _resample(checked, aggregates, n_resamples, seed)
    facts = {name: {"n": len(units), "units": len(set(units)), "mean_a": mean_a,
                    "mean_b": mean_b}
             for name, (units, _, mean_a, mean_b) in checked.items()}
    for name, members in aggregates.items():
        facts[name] = {"n": sum(facts[m]["n"] for m in members),
                       "units": len({u for m in members for u in checked[m][0]}),
                       "mean_a": float(np.mean([facts[m]["mean_a"] for m in members])),
                       "mean_b": float(np.mean([facts[m]["mean_b"] for m in members]))}
    results = {}
    for name, diff in observed.items():
        ci, p = _interval_and_p(resampled[name], confidence)
        resamples = int(np.isfinite(resampled[name]).sum())
        results[name] = {"diff": diff, "ci": ci, "p": p, "resamples": resamples, **facts[name]}
    return results


def excludes_zero(result):
    """Whether a `bootstrap_differences` entry's interval excludes 0 (the heat maps' mark)."""
    low, high = result["ci"]
    return low > 0 or high < 0


# ----------------------------------------------------------------------------------------------
# Helpers for the caller


def align_cells(scores_a, scores_b, unit_of=None):
    """Pair two models' per-example scores into `bootstrap_differences`' cells.

    scores_a, scores_b: {cell name: {example id: score}}, the same cells and, in each cell, the
    same example ids. unit_of: example id -> resampling unit (default: the id itself, right for
    MLQA, whose question id is shared by an instance's pairs). Ids are sorted within a cell.
    """
    missing = [c for c in scores_a if c not in scores_b] + \
        [c for c in scores_b if c not in scores_a]
    if missing:
        side = "B" if missing[0] in scores_a else "A"
        raise InputError(f"cell '{missing[0]}' has no scores for model {side}")
    unit_of = (lambda i: i) if unit_of is None else unit_of
    cells = {}
    for name, by_id_a in scores_a.items():
        by_id_b = scores_b[name]
        if set(by_id_a) != set(by_id_b):
            only = sorted(set(by_id_a) ^ set(by_id_b), key=str)
            raise InputError(f"cell '{name}': the two models were scored on different examples "
                             f"({len(only)} ids in only one, e.g. '{only[0]}')")
        try:
            ids = sorted(by_id_a)
        except TypeError:
            ids = list(by_id_a)
        cells[name] = ([unit_of(i) for i in ids], [by_id_a[i] for i in ids],
                       [by_id_b[i] for i in ids])
    return cells


def wilcoxon_p(scores_a, scores_b, zero_method=WILCOXON_ZERO_METHOD):
    """Two-sided Wilcoxon signed-rank p-value of the per-example differences B - A (scipy).

    The authors' test, for comparability only (see the module docstring): it treats the examples
    as independent. Apply any selection (e.g. XLT: same-language pairs) before calling. 1.0 when
    every difference is zero (scipy raises or returns NaN there, depending on its version).
    """
    from scipy.stats import wilcoxon
    a, b = _scores(scores_a, "wilcoxon model A"), _scores(scores_b, "wilcoxon model B")
    if len(a) != len(b):
        raise InputError(f"wilcoxon: lengths differ ({len(a)} scores of A, {len(b)} of B)")
    if len(a) == 0:
        raise InputError("wilcoxon: no examples")
    diff = b - a
    if not np.any(diff):
        return 1.0
    with warnings.catch_warnings():  # scipy notes when it falls back to the normal approximation
        warnings.simplefilter("ignore")
        return float(wilcoxon(diff, zero_method=zero_method).pvalue)


def seed_summary(values):
    """Mean, sample standard deviation (ddof=1; None for one value) and n of runs that differ
    only in their seed: {"mean", "std", "n"}."""
    x = _scores(values, "seed summary")
    if x.size == 0:
        raise InputError("seed summary: no values")
    std = float(np.std(x, ddof=1)) if x.size > 1 else None
    return {"mean": float(x.mean()), "std": std, "n": int(x.size)}


if __name__ == "__main__":
    not_a_script(__file__)
