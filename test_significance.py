"""Tests of significance.py (issue 11): `python -m pytest test_significance.py -q` (CPU, ~1 s)."""
import itertools
import math

import numpy as np
import pytest
import scipy.stats

import significance as sig
from common import InputError

LANGS = ["en", "es", "de", "ar", "vi", "hi", "zh"]


def mlqa_sized_fixture(n_units=12_000, n_examples=41_000, seed=1):
    """49 pair cells over shared instance ids, ~n_examples examples in all; B beats A on ~10%."""
    rng = np.random.default_rng(seed)
    cells = {}
    for q, c in itertools.product(LANGS, LANGS):
        ids = np.flatnonzero(rng.random(n_units) < n_examples / 49 / n_units)
        a = rng.choice([0.0, 50.0, 100.0], size=len(ids))
        b = np.where(rng.random(len(ids)) < 0.1, 100.0, a)
        cells[f"{q}-{c}"] = ([f"q{i}" for i in ids], a, b)
    aggregates = {"g_xlt": list(cells), "xlt": [f"{l}-{l}" for l in LANGS]}
    return cells, aggregates


# ------------------------------------------------------------------------------------------------
# The observed difference, p and interval


def test_identical_predictions_give_zero_difference_p_one_and_zero_interval():
    cells, aggregates = mlqa_sized_fixture(n_units=300, n_examples=2000)
    cells = {name: (units, a, a.copy()) for name, (units, a, _) in cells.items()}
    results = sig.bootstrap_differences(cells, aggregates, n_resamples=500)
    assert set(results) == set(cells) | set(aggregates)
    for name, r in results.items():
        assert r["diff"] == 0.0, name
        assert r["p"] == 1.0, name
        assert r["ci"] == [0.0, 0.0], name
        assert not sig.excludes_zero(r)


def test_better_on_a_known_subset_gives_the_hand_computed_difference():
    # A: 40 zeros, 180 hundreds, 180 zeros; B is 100 on the first 40 -> B - A = 100 * 40 / 400
    a = [0.0] * 40 + [100.0] * 180 + [0.0] * 180
    b = [100.0] * 40 + a[40:]
    r = sig.bootstrap_differences({"cell": (range(400), a, b)}, n_resamples=4000)["cell"]
    assert r["diff"] == pytest.approx(10.0)
    assert r["mean_a"] == pytest.approx(45.0) and r["mean_b"] == pytest.approx(55.0)
    assert (r["n"], r["units"]) == (400, 400)
    assert r["p"] < 0.05
    assert r["ci"][0] < 10.0 < r["ci"][1] and r["ci"][0] > 0
    assert sig.excludes_zero(r)


def test_better_on_one_of_five_examples_is_not_significant():
    # B - A = 100 on one of 5 examples: diff 20; a resample without that example (probability
    # (4/5)^5 = 0.33) is as extreme as 0 under the null, so p is large
    r = sig.bootstrap_differences({"cell": (range(5), [0, 0, 0, 0, 0], [100, 0, 0, 0, 0])},
                                  n_resamples=4000)["cell"]
    assert r["diff"] == pytest.approx(20.0)
    assert r["p"] > 0.05
    assert not sig.excludes_zero(r)


def test_the_sign_follows_b_minus_a():
    cells = {"cell": (range(200), [0.0] * 200, [100.0] * 30 + [0.0] * 170)}
    ab = sig.bootstrap_differences(cells, n_resamples=1000)["cell"]
    swapped = {"cell": (range(200), cells["cell"][2], cells["cell"][1])}
    ba = sig.bootstrap_differences(swapped, n_resamples=1000)["cell"]
    assert ab["diff"] == pytest.approx(15.0) and ba["diff"] == pytest.approx(-15.0)
    assert ba["ci"] == pytest.approx([-ab["ci"][1], -ab["ci"][0]])
    assert ab["p"] == ba["p"]


def test_deterministic_for_a_seed_and_different_across_seeds():
    cells, aggregates = mlqa_sized_fixture(n_units=500, n_examples=3000)
    first = sig.bootstrap_differences(cells, aggregates, n_resamples=1000, seed=7)
    again = sig.bootstrap_differences(cells, aggregates, n_resamples=1000, seed=7)
    other = sig.bootstrap_differences(cells, aggregates, n_resamples=1000, seed=8)
    assert first == again
    for name in ("g_xlt", "en-en"):
        assert first[name]["ci"] != other[name]["ci"]
        width = first[name]["ci"][1] - first[name]["ci"][0]
        assert first[name]["ci"] == pytest.approx(other[name]["ci"], abs=0.2 * width)
        assert first[name]["diff"] == other[name]["diff"]


# ------------------------------------------------------------------------------------------------
# The bootstrap distribution against an exact enumeration


def _exact_distribution(cells, n_units):
    """Every ordered draw of n_units units (equally likely): the statistic of each cell and of the
    mean of the cells (NaN cells left out), computed plainly."""
    stats = {name: [] for name in cells}
    stats["both"] = []
    for draw in itertools.product(range(n_units), repeat=n_units):
        weight = [draw.count(u) for u in range(n_units)]
        values = []
        for name, (units, a, b) in cells.items():
            total = sum(weight[u] * (y - x) for u, x, y in zip(units, a, b))
            count = sum(weight[u] for u in units)
            values.append(total / count if count else math.nan)
            stats[name].append(values[-1])
        finite = [v for v in values if not math.isnan(v)]
        stats["both"].append(sum(finite) / len(finite))
    return {name: np.array(v) for name, v in stats.items()}


@pytest.mark.parametrize("chunk_elements", [sig.CHUNK_ELEMENTS, 12])  # 12: chunks of 3 resamples
def test_bootstrap_distribution_matches_exact_enumeration(monkeypatch, chunk_elements):
    monkeypatch.setattr(sig, "CHUNK_ELEMENTS", chunk_elements)
    # 4 units; unit 0 has two examples in x; unit 3 is absent from y, so y gets no weight when
    # all four draws are unit 3 (probability 1/256)
    cells = {"x": ([0, 0, 1, 2, 3], [50, 20, 70, 10, 0], [60, 50, 50, 10, 50]),
             "y": ([0, 1, 1, 2], [0, 100, 50, 25], [100, 100, 0, 50])}
    exact = _exact_distribution(cells, 4)
    n = 40_000
    observed, boot = sig.resample_differences(cells, {"both": ["x", "y"]}, n_resamples=n, seed=3)
    assert observed["x"] == pytest.approx(np.mean([10, 30, -20, 0, 50]))
    assert observed["both"] == pytest.approx((70 / 5 + (100 - 50 + 25) / 4) / 2)
    for name in ("x", "y", "both"):
        e, b = exact[name], boot[name]
        assert b.shape == (n,)
        p_nan = np.isnan(e).mean()
        assert np.isnan(b).mean() == pytest.approx(p_nan, abs=5 * math.sqrt(p_nan / n) + 1e-9)
        e, b = e[np.isfinite(e)], b[np.isfinite(b)]
        assert b.mean() == pytest.approx(e.mean(), abs=5 * e.std() / math.sqrt(n))
        for t in np.quantile(e, [0.05, 0.2, 0.4, 0.6, 0.8, 0.95]):
            cdf = (e <= t + 1e-9).mean()
            assert (b <= t + 1e-9).mean() == pytest.approx(
                cdf, abs=5 * math.sqrt(cdf * (1 - cdf) / n) + 1e-4), (name, t)
        for q in (0.025, 0.5, 0.975):
            low, high = np.quantile(e, [q - 0.01, q + 0.01], method="inverted_cdf")
            assert low - 1e-9 <= np.quantile(b, q) <= high + 1e-9, (name, q)
    assert np.isnan(exact["y"]).sum() == 1 and not np.isnan(boot["both"]).any()


def test_interval_and_p_come_from_the_resampled_distribution():
    cells = {"x": ([0, 0, 1, 2, 3, 4, 5], [0, 0, 100, 50, 0, 0, 100],
                   [100, 0, 100, 100, 0, 50, 100])}
    observed, boot = sig.resample_differences(cells, n_resamples=3000, seed=5)
    r = sig.bootstrap_differences(cells, n_resamples=3000, seed=5, confidence=0.9)["x"]
    d = observed["x"]
    assert r["ci"] == pytest.approx(list(np.quantile(boot["x"], [0.05, 0.95])))
    assert r["p"] == pytest.approx((1 + np.sum(np.abs(boot["x"] - d) >= abs(d))) / 3001)


def test_a_resample_on_the_p_value_boundary_counts_despite_rounding():
    d = 0.1 * 3                   # 0.30000000000000004; a resample of 0.6 = 2d lies on the
                                  # boundary |d* - d| = |d|
    assert abs(0.6 - d) < abs(d)  # ... but rounding puts it just inside
    _, p = sig._interval_and_p(d, np.array([0.6, 0.35]), 0.95)
    assert p == pytest.approx((1 + 1) / 3)


# ------------------------------------------------------------------------------------------------
# Units are resampled jointly across cells; aggregates


def test_perfectly_correlated_cells_have_identical_resamples_and_aggregate_interval():
    rng = np.random.default_rng(0)
    n = 300
    diff = rng.choice([-100.0, 0.0, 0.0, 50.0, 100.0], size=n)
    a1 = rng.uniform(0, 100, size=n)
    a2 = rng.uniform(0, 100, size=n)
    ids = [f"id{i}" for i in range(n)]
    order = rng.permutation(n)  # the same instances, listed in another order
    cells = {"p": (ids, a1, a1 + diff),
             "q": ([ids[i] for i in order], a2[order], a2[order] + diff[order])}
    _, boot = sig.resample_differences(cells, {"pq": ["p", "q"]}, n_resamples=2000)
    np.testing.assert_allclose(boot["p"], boot["q"], rtol=0, atol=1e-9)
    r = sig.bootstrap_differences(cells, {"pq": ["p", "q"]}, n_resamples=2000)
    assert r["pq"]["ci"] == pytest.approx(r["p"]["ci"], abs=1e-9)
    assert r["pq"]["ci"] == pytest.approx(r["q"]["ci"], abs=1e-9)
    assert r["pq"]["units"] == n and r["pq"]["n"] == 2 * n

    # the same two cells on disjoint instances: independent, the mean's interval is narrower
    halves = {"p": (ids, a1, a1 + diff), "q": ([f"other{i}" for i in range(n)], a2, a2 + diff)}
    h = sig.bootstrap_differences(halves, {"pq": ["p", "q"]}, n_resamples=2000)
    width = {name: h[name]["ci"][1] - h[name]["ci"][0] for name in h}
    assert width["pq"] < 0.85 * min(width["p"], width["q"])
    assert h["pq"]["units"] == 2 * n


def test_aggregate_is_the_unweighted_mean_of_cell_means():
    # big: 3 examples, mean B - A = 10; small: 1 example, 40 -> aggregate 25 (weighted: 17.5)
    cells = {"big": (["a", "b", "c"], [0, 0, 0], [0, 10, 20]), "small": (["a"], [50], [90])}
    r = sig.bootstrap_differences(cells, {"all": ["big", "small"]}, n_resamples=500)
    assert r["big"]["diff"] == pytest.approx(10.0) and r["small"]["diff"] == pytest.approx(40.0)
    assert r["all"]["diff"] == pytest.approx(25.0)
    assert r["all"]["mean_a"] == pytest.approx(25.0) and r["all"]["mean_b"] == pytest.approx(50.0)
    assert (r["all"]["n"], r["all"]["units"]) == (4, 3)
    _, boot = sig.resample_differences(cells, {"all": ["big", "small"]}, n_resamples=500)
    both = np.isfinite(boot["small"])
    np.testing.assert_allclose(boot["all"][both], (boot["big"][both] + boot["small"][both]) / 2)
    np.testing.assert_allclose(boot["all"][~both], boot["big"][~both])  # a NaN cell is left out
    assert (~both).any()  # 'a' is missing from some resamples


def test_mlqa_sized_fixture_runs_and_pools_to_narrower_intervals():
    cells, aggregates = mlqa_sized_fixture()
    r = sig.bootstrap_differences(cells, aggregates, n_resamples=300)
    assert r["g_xlt"]["n"] == sum(len(u) for u, _, _ in cells.values())
    assert 11_000 < r["g_xlt"]["units"] <= 12_000
    width = {name: r[name]["ci"][1] - r[name]["ci"][0] for name in r}
    assert width["g_xlt"] < width["xlt"] < min(width[c] for c in cells)
    expected = np.mean([np.mean(b - a) for _, a, b in cells.values()])
    assert r["g_xlt"]["diff"] == pytest.approx(expected)
    assert r["g_xlt"]["p"] < 0.01


# ------------------------------------------------------------------------------------------------
# Wilcoxon, seed summary, alignment


def test_wilcoxon_p_agrees_with_scipy_and_is_one_without_differences():
    rng = np.random.default_rng(0)
    a = rng.choice([0.0, 40.0, 100.0], size=500)
    b = np.where(rng.random(500) < 0.2, rng.choice([0.0, 100.0], size=500), a)
    expected = scipy.stats.wilcoxon(b - a).pvalue
    assert sig.wilcoxon_p(a, b) == pytest.approx(expected, rel=1e-12)
    assert sig.wilcoxon_p(b, a) == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < 1
    assert sig.wilcoxon_p(a, a) == 1.0
    assert sig.wilcoxon_p([1.0], [1.0]) == 1.0
    with pytest.raises(InputError, match="lengths differ"):
        sig.wilcoxon_p([1, 2], [1])
    with pytest.raises(InputError, match="no examples"):
        sig.wilcoxon_p([], [])


def test_seed_summary_by_hand():
    s = sig.seed_summary([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))  # squares 2.25+0.25+0.25+2.25 over 3
    assert s["n"] == 4
    assert sig.seed_summary([61.2]) == {"mean": 61.2, "std": None, "n": 1}
    with pytest.raises(InputError):
        sig.seed_summary([])


def test_align_cells_pairs_scores_by_id():
    a = {"en-en": {"q2": 0.0, "q1": 100.0}, "en-de": {"q1": 50.0}}
    b = {"en-de": {"q1": 60.0}, "en-en": {"q1": 80.0, "q2": 10.0}}
    cells = sig.align_cells(a, b)
    assert cells == {"en-en": (["q1", "q2"], [100.0, 0.0], [80.0, 10.0]),
                     "en-de": (["q1"], [50.0], [60.0])}
    r = sig.bootstrap_differences(cells, {"all": ["en-en", "en-de"]}, n_resamples=100)
    assert r["en-en"]["diff"] == pytest.approx(-5.0) and r["all"]["units"] == 2
    grouped = sig.align_cells(a, b, unit_of=lambda i: "same")
    assert grouped["en-en"][0] == ["same", "same"]
    with pytest.raises(InputError, match="cell 'en-en'.*different examples.*'q2'"):
        sig.align_cells(a, {"en-de": {"q1": 1.0}, "en-en": {"q1": 1.0}})
    with pytest.raises(InputError, match="cell 'en-de' has no scores for model B"):
        sig.align_cells(a, {"en-en": b["en-en"]})
    with pytest.raises(InputError, match="cell 'zh-zh' has no scores for model A"):
        sig.align_cells(a, {**b, "zh-zh": {"q1": 1.0}})


# ------------------------------------------------------------------------------------------------
# Bad input


GOOD = {"x": (["a", "b"], [0.0, 100.0], [100.0, 100.0])}


@pytest.mark.parametrize("kwargs, message", [
    (dict(cells={}), "no cells"),
    (dict(cells={"x": (["a", "b"], [0.0], [1.0, 2.0])}), "cell 'x': lengths differ"),
    (dict(cells={"x": ([], [], [])}), "cell 'x': no examples"),
    (dict(cells={"x": (["a"], [math.nan], [1.0])}), "cell 'x': scores must be finite"),
    (dict(cells={"x": (["a"], ["good"], [1.0])}), "cell 'x': scores must be numbers"),
    (dict(cells={"x": (["a"], [1.0])}), "cell 'x': expected"),
    (dict(cells={"x": ([["a"]], [1.0], [2.0])}), "unit ids must be hashable"),
    (dict(cells=GOOD, aggregates={"all": ["x", "y"]}), "aggregate 'all': unknown cell 'y'"),
    (dict(cells=GOOD, aggregates={"all": []}), "aggregate 'all': no cells"),
    (dict(cells=GOOD, aggregates={"all": ["x", "x"]}), "listed twice"),
    (dict(cells=GOOD, aggregates={"x": ["x"]}), "aggregate 'x' has the name of a cell"),
    (dict(cells=GOOD, n_resamples=0), "resamples must be an integer >= 1"),
    (dict(cells=GOOD, n_resamples=2.5), "resamples must be an integer >= 1"),
    (dict(cells=GOOD, confidence=0.0), "confidence level"),
    (dict(cells=GOOD, confidence=1.0), "confidence level"),
    (dict(cells=GOOD, confidence=95), "confidence level"),
])
def test_bad_input_raises_one_line_input_error(kwargs, message):
    with pytest.raises(InputError, match=message) as e:
        sig.bootstrap_differences(**kwargs)
    assert "\n" not in str(e.value)
    if "confidence" not in kwargs:  # the lower-level function checks the same
        with pytest.raises(InputError, match=message):
            sig.resample_differences(**kwargs)
