"""Tables and figures of the paper from metrics dictionaries (no model, no data set, no scoring here).

Everything is a function of what `evaluate_mlqa.py --model` writes to `OUT/metrics.json` (and, for
Table 1, of n-best answer lists); `evaluate_mlqa.py` calls these to write the figures and
`summary.md`:

    python evaluate_mlqa.py --model runs/mbert-qa-en --output-dir runs/mbert-qa-en/eval
    python evaluate_mlqa.py --model runs/skd --output-dir runs/skd/eval --baseline runs/mbert-qa-en/eval
    python evaluate_mlqa.py --sweep runs/sweep/* --output-dir runs/sweep-report

What maps to what in the paper:
  Fig. 1 / Fig. 8   heat map of the 7x7 MLQA F1 / EM matrix   (rows: question language,
                    columns: context language, order en es de ar vi hi zh)      pair_heatmaps
  Fig. 3 / Fig. 9   the same, model minus baseline                             difference_heatmaps
  Table 1           rank of the first correct answer in the top 10            hidden_knowledge_counts
  Table 2 / 5       MLQA G-XLT and XLT means (+ XQuAD / TyDiQA XLT)            summary_markdown
  Table 3           per-context-language means over question languages        summarize_pairs
  Table 4           XQuAD el ru tr th, TyDiQA-GoldP per language              summary_markdown
  Fig. 4 / Fig. 7   alpha over training steps (distill.py's train_log.jsonl)        alpha_figure
  Fig. 5 / Fig. 11  MLQA-dev G-XLT and XLT F1 / EM against ntl, one line per mode   sweep_report
  Fig. 6 / Fig. 10  MLQA-dev G-XLT F1 / EM over temperature t x ntl, one per mode   sweep_report

All averages are unweighted means over language pairs, as the paper reports them: XLT over the 7
pairs with q == c; G-XLT over ALL 49 pairs (Table 2's G-XLT is the mean of Table 3's per-context
means, e.g. mBERT-qa-en dev (59.3 + 55.1 + 49.5 + 43.3 + 48.5 + 44.2 + 48.1) / 7 = 49.7, and the
authors' scores.py averages all 49 rows); `gxlt_cross` is the extra mean over the 42 pairs with
q != c only. Every file is written under a temporary name and renamed into place.
"""
import json
import math
import os

import numpy as np

from common import (LANGUAGES, TYDIQA_ZERO_SHOT, XQUAD_ZERO_SHOT, InputError, atomic_file,
                    atomic_write_text, is_number, not_a_script, read_json)
import significance
from significance import seed_summary

METRICS = {"f1": "F1", "exact_match": "EM"}
FIGSIZE = (6.0, 5.0)  # inches per heat-map panel; PNG pixels = FIGSIZE * DPI
DPI = 100


# ----------------------------------------------------------------------------------------------
# Language-pair matrices and their means (Tables 2 and 3)

def pair_matrix(pairs, metric="f1", languages=LANGUAGES):
    """{"q-c": {"f1", "exact_match", ...}} -> array [question language, context language]; NaN
    where a pair is missing."""
    m = np.full((len(languages), len(languages)), np.nan)
    for i, q in enumerate(languages):
        for j, c in enumerate(languages):
            scores = pairs.get(f"{q}-{c}")
            if scores is not None:
                m[i, j] = float(scores[metric])
    return m


def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarize_pairs(pairs, languages=LANGUAGES):
    """XLT (the q == c pairs), G-XLT (all pairs), G-XLT q != c only (`gxlt_cross`) and
    per-context-language means (Table 3: the mean over the question languages, the same-language
    pair included) of both metrics. A mean over no pair is None."""
    out = {"xlt": {}, "gxlt": {}, "gxlt_cross": {}, "per_context": {c: {} for c in languages}}
    for metric in METRICS:
        m = pair_matrix(pairs, metric, languages)
        diagonal = np.eye(len(languages), dtype=bool)
        out["xlt"][metric] = _mean(m[diagonal].tolist())
        out["gxlt"][metric] = _mean(m.ravel().tolist())               # all 49 pairs (Table 2)
        out["gxlt_cross"][metric] = _mean(m[~diagonal].tolist())
        for j, c in enumerate(languages):
            out["per_context"][c][metric] = _mean(m[:, j].tolist())
    return out


def same_language_summary(pairs):
    """XQuAD / TyDiQA: the XLT mean over the same-language pairs present."""
    return {metric: _mean([s[metric] for key, s in pairs.items()
                           if key.split("-")[0] == key.split("-")[-1]])
            for metric in METRICS}


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend, fixed pixel size: len(panels) * FIGSIZE * DPI)

def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write a matplotlib figure as PNG atomically (common.atomic_file)."""
    plt = pyplot()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path


def heatmap_figure(panels, path, row_labels=LANGUAGES, col_labels=LANGUAGES,
                   xlabel="context language", ylabel="question language", diverging=False,
                   fmt="{:.1f}", suptitle=None, marks=None, cbar_label="score"):
    """One PNG with one annotated heat map per panel, side by side.

    panels: list of (title, 2-D array); NaN cells stay blank. One colour scale for the whole
    figure, shared by all its panels (dev and test side by side are comparable; the paper's
    Fig. 6: "minimum and maximum values are relative to each figure"), shown by one colour bar
    labelled `cbar_label`; with diverging, the range is symmetric around 0 (red = worse, green =
    better: Fig. 3 and 9). marks: per panel a set of (row, column) cells to dot (a difference
    whose CI excludes 0).
    """
    plt = pyplot()
    n = len(panels)
    matrices = [np.asarray(matrix, dtype=float) for _, matrix in panels]
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices]) if matrices else np.array([])
    if diverging:
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        bound = bound or 1.0
        vmin, vmax, cmap = -bound, bound, "RdYlGn"
    else:
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
        if vmax == vmin:
            vmax = vmin + 1.0
        cmap = "viridis"
    fig, axes = plt.subplots(1, n, figsize=(FIGSIZE[0] * n, FIGSIZE[1]), dpi=DPI, squeeze=False,
                             layout="constrained")
    for p, (ax, (title, _), matrix) in enumerate(zip(axes[0], panels, matrices)):
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax,
                          aspect="auto")
        ax.set_xticks(range(len(col_labels)), [str(x) for x in col_labels])
        ax.set_yticks(range(len(row_labels)), [str(x) for x in row_labels])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if np.isfinite(matrix[i, j]):
                    r, g, b, _ = image.cmap(image.norm(matrix[i, j]))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center",
                            fontsize=8, color="white" if dark else "black")
        if marks is not None:
            cells = sorted(marks[p])
            ax.scatter([j + 0.32 for _, j in cells], [i - 0.3 for i, _ in cells], s=10, c="black",
                       marker="o", label="95% CI of the difference excludes 0")
            ax.legend(handles=[plt.Line2D([], [], ls="", marker="o", ms=3, c="black",
                                          label="95% CI of the difference excludes 0 (paired "
                                                "bootstrap)")],
                      loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False, fontsize=7)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.046 / n, pad=0.02, label=cbar_label)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)


def alpha_figure(rows, path):
    """Fig. 4 / Fig. 7: alpha per optimisation step (distill.py's train_log.jsonl rows), a dashed
    line at each epoch boundary. Returns False (nothing drawn) for a run without alpha. Only for
    --map-k runs: plain skd logs its constant a_kl = 1 as alpha, which is no mAP@k (the caller
    knows the mode; the log rows do not)."""
    rows = [r for r in rows if r.get("alpha") is not None]
    if not rows:
        return False
    fig, ax = pyplot().subplots(figsize=(8, 4), dpi=DPI)
    ax.plot([r["step"] for r in rows], [r["alpha"] for r in rows], lw=0.8)
    for prev, row in zip(rows, rows[1:]):
        if row["epoch"] != prev["epoch"]:
            ax.axvline(prev["step"] + 0.5, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(r"$\alpha_{kl}^{mAP@k}$")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("mAP@k coefficient during training (epochs dashed)")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _split_title(split):
    return {"mlqa-dev": "MLQA-dev", "mlqa-test": "MLQA-test", "xquad": "XQuAD",
            "tydiqa": "TyDiQA-GoldP"}.get(split, split)


def pair_heatmaps(metrics, out_dir, splits=("mlqa-dev", "mlqa-test"), name=""):
    """Fig. 1 (F1) and Fig. 8 (EM): one panel per MLQA split present in `metrics`.

    Returns the paths written: out_dir/fig1_mlqa_f1.png, out_dir/fig8_mlqa_em.png."""
    present = [s for s in splits if s in metrics]
    if not present:
        return []
    paths = []
    for metric, fig, stem in (("f1", "fig1", "f1"), ("exact_match", "fig8", "em")):
        panels = [(f"{_split_title(s)} {METRICS[metric]}" + (f" ({name})" if name else ""),
                   pair_matrix(metrics[s]["pairs"], metric)) for s in present]
        paths.append(heatmap_figure(panels, os.path.join(out_dir, f"{fig}_mlqa_{stem}.png"),
                                    cbar_label=f"{METRICS[metric]} (0-100)"))
    return paths


def difference_matrix(pairs, baseline_pairs, metric="f1"):
    """model - baseline per (question, context) pair; NaN where either lacks the pair."""
    return pair_matrix(pairs, metric) - pair_matrix(baseline_pairs, metric)


def difference_heatmaps(metrics, baseline, out_dir, splits=("mlqa-dev", "mlqa-test"),
                        name="model", baseline_name="baseline", marks=None, suffix=""):
    """Fig. 3 (F1) and Fig. 9 (EM): model minus baseline, one panel per split both have. marks
    ({split: {metric: pair keys}}, see significant_pairs): cells whose 95% CI excludes 0 get a
    dot, explained in a legend.

    Returns the paths written: out_dir/fig3_mlqa_f1_diff{suffix}.png, .../fig9_mlqa_em_diff..."""
    present = [s for s in splits if s in metrics and s in baseline]
    if not present:
        return []
    paths = []
    for metric, fig, stem in (("f1", "fig3", "f1"), ("exact_match", "fig9", "em")):
        panels = [(f"{_split_title(s)} {METRICS[metric]}: {name} - {baseline_name}",
                   difference_matrix(metrics[s]["pairs"], baseline[s]["pairs"], metric))
                  for s in present]
        cells = None if marks is None else [
            {(LANGUAGES.index(k.split("-")[0]), LANGUAGES.index(k.split("-")[1]))
             for k in marks.get(s, {}).get(metric, ())} for s in present]
        paths.append(heatmap_figure(panels, os.path.join(out_dir,
                                                         f"{fig}_mlqa_{stem}_diff{suffix}.png"),
                                    diverging=True, fmt="{:+.1f}", marks=cells,
                                    cbar_label=f"{METRICS[metric]} difference, {name} - "
                                               f"{baseline_name}"))
    return paths


def significant_pairs(comparison):
    """{split: {metric: {pair keys whose 95% CI of B - A excludes 0}}} of a compare_two result."""
    if not comparison:
        return None
    return {split: {metric: {key for key, r in value[metric]["pairs"].items()
                             if significance.excludes_zero(r)} for metric in METRICS}
            for split, value in comparison.items() if split.startswith("mlqa-")}


# ----------------------------------------------------------------------------------------------
# Markdown summary (Tables 1 to 5)

def _fmt(scores, metrics=("f1", "exact_match")):
    """'F1/EM' with one decimal, '-' where absent (the paper's cell format)."""
    if not scores:
        return "-"
    parts = [scores.get(m) for m in metrics]
    if all(p is None for p in parts):
        return "-"
    return "/".join("-" if p is None else f"{p:.1f}" for p in parts)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _split_means(split_metrics):
    """xlt / gxlt / gxlt_cross / per_context of an MLQA split, always recomputed from its pairs
    (a metrics.json written before 2026-11-28 holds a 42-pair gxlt)."""
    if not split_metrics.get("pairs"):
        return {key: split_metrics.get(key) or {} for key in ("xlt", "gxlt", "gxlt_cross",
                                                              "per_context")}
    return summarize_pairs(split_metrics["pairs"])


def _pair_langs(pairs, default):
    present = sorted({key.split("-")[0] for key in pairs})
    return [l for l in default if l in present] + [l for l in present if l not in default]


def summary_markdown(runs, title="Evaluation summary"):
    """A markdown report mirroring the paper's tables, one row per model.

    runs: list of (name, metrics) where metrics is what `evaluate_mlqa.py --model` writes. Cells
    are 'F1/EM'; '-' where a model was not evaluated on that data."""
    runs = list(runs)
    splits = [s for s in ("mlqa-dev", "mlqa-test") if any(s in m for _, m in runs)]
    sections = [_averages_section(runs, splits), _per_context_section(runs, splits),
                _pairs_section(runs, splits), _zero_shot_section(runs, "xquad", "XQuAD",
                                                                 XQUAD_ZERO_SHOT),
                _zero_shot_section(runs, "tydiqa", "TyDiQA-GoldP", TYDIQA_ZERO_SHOT),
                _hidden_knowledge_section(runs), _other_datasets_section(runs)]
    return "\n".join([f"# {title}", ""] + [line for sec in sections for line in sec]).rstrip() + "\n"


def _xlt(metrics, key):
    """XQuAD / TyDiQA XLT of one model, or None when it was not evaluated on that data."""
    if key not in metrics:
        return None
    return metrics[key].get("xlt") or same_language_summary(metrics[key]["pairs"])


def _averages_section(runs, splits):
    """Tables 2 and 5: MLQA G-XLT (all 49 pairs), XLT, and the zero-shot XLT means."""
    has = {key: any(key in m for _, m in runs) for key in ("xquad", "tydiqa")}
    if not (splits or any(has.values())):
        return []
    header = ["model"]
    for s in splits:
        header += [f"{_split_title(s)} G-XLT", f"{_split_title(s)} XLT",
                   f"{_split_title(s)} G-XLT q!=c"]
    header += ["XQuAD XLT"] * has["xquad"] + ["TyDiQA-GoldP XLT"] * has["tydiqa"]
    rows = []
    for name, m in runs:
        row = [name]
        for s in splits:
            means = _split_means(m[s]) if s in m else {}
            row += [_fmt(means.get("gxlt")), _fmt(means.get("xlt")), _fmt(means.get("gxlt_cross"))]
        row += [_fmt(_xlt(m, "xquad"))] * has["xquad"] + [_fmt(_xlt(m, "tydiqa"))] * has["tydiqa"]
        rows.append(row)
    return ["## Averages, F1/EM (Tables 2 and 5)", "",
            "G-XLT: mean over all 49 MLQA (question, context) language pairs, as the paper's Table 2 "
            "(= the mean of Table 3's per-context means); XLT: mean over the 7 same-language pairs; "
            "G-XLT q!=c: the 42 pairs with different languages only (not in the paper).", "",
            _table(header, rows), ""]


def _per_context_section(runs, splits):
    """Table 3: per context (answer) language, the mean over the 7 question languages."""
    out = []
    for s in splits:
        rows = [[name] + [_fmt(_split_means(m[s])["per_context"].get(c)) if s in m else "-"
                          for c in LANGUAGES] for name, m in runs]
        out += [f"## {_split_title(s)} per context language, F1/EM (Table 3)", "",
                "Mean over the 7 question languages for each context (answer) language, both "
                "metrics alike (the paper's EM column is not this mean: its mean equals Table 2's "
                "XLT EM).", "", _table(["model"] + LANGUAGES, rows), ""]
    return out


def _pairs_section(runs, splits):
    """Fig. 1 / Fig. 8 as tables: the 7x7 F1 and EM matrices of every model."""
    out = []
    for s in splits:
        for name, m in runs:
            if s not in m:
                continue
            for metric in METRICS:
                matrix = pair_matrix(m[s]["pairs"], metric)
                rows = [[q] + ["-" if math.isnan(v) else f"{v:.1f}" for v in matrix[i]]
                        for i, q in enumerate(LANGUAGES)]
                fig = "Fig. 1" if metric == "f1" else "Fig. 8"
                out += [f"### {_split_title(s)} {METRICS[metric]} by pair, {name} ({fig})", "",
                        "Rows: question language; columns: context language.", "",
                        _table(["q \\ c"] + LANGUAGES, rows), ""]
    return out


def _zero_shot_section(runs, key, label, default_languages):
    """Table 4: XQuAD el ru tr th and TyDiQA-GoldP, per language."""
    if not any(key in m for _, m in runs):
        return []
    langs = []
    for _, m in runs:
        for lang in _pair_langs(m.get(key, {}).get("pairs", {}), default_languages):
            if lang not in langs:
                langs.append(lang)
    rows = [[name, _fmt(_xlt(m, key))] +
            [_fmt(m[key]["pairs"].get(f"{l}-{l}")) if key in m else "-" for l in langs]
            for name, m in runs]
    return [f"## {label} zero-shot, F1/EM (Table 4)", "", _table(["model", "XLT"] + langs, rows), ""]


def _hidden_knowledge_section(runs):
    """Table 1: the rank of the first correct answer among each model's top k, by question
    language (counted by evaluate_mlqa.hidden_knowledge_counts)."""
    out = []
    for name, m in runs:
        hk = m.get("hidden-knowledge")
        if not hk:
            continue
        langs = hk["languages"]
        rows = [[r + 1] + [hk["counts"][q][r] for q in langs] for r in range(hk["k"])]
        rows.append([f"not in top {hk['k']}"] + [hk["not_in_top_k"][q] for q in langs])
        rows.append(["examples"] + [hk["n"][q] for q in langs])
        rule = {"em": "exact match with any gold answer",
                "raw": "the raw string equal to the first gold answer (the authors' count)"}.get(
            hk["criterion"], f"F1 >= {hk.get('f1_threshold')} with any gold answer")
        out += [f"## Hidden knowledge on {_split_title(hk.get('split', 'mlqa-dev'))}, {name} "
                "(Table 1)", "",
                f"Examples whose first correct answer ({rule}) is at rank r of the top "
                f"{hk['k']}, by question language.", "", _table(["rank"] + langs, rows), ""]
    return out


def _other_datasets_section(runs):
    """Files scored with --dataset: one row each."""
    others = [(name, key, v) for name, m in runs for key, v in m.items()
              if isinstance(v, dict) and "f1" in v and "pairs" not in v]
    if not others:
        return []
    rows = [[name, key, _fmt(v), v.get("n", "-")] for name, key, v in others]
    return ["## Other data sets, F1/EM", "", _table(["model", "data set", "F1/EM", "n"], rows), ""]


def _p(p, resamples=None):
    """A p-value for the tables; at the bootstrap's floor 1/N (N resamples) "< 1/N", e.g.
    "< 1e-4": the resamples cannot tell a smaller p."""
    if p is None:
        return "-"
    if resamples and p <= 1 / resamples:
        return f"< {1 / resamples:.0e}".replace("e-0", "e-") if resamples >= 1000 else \
            f"< 1/{resamples}"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _signed(x):
    return f"{x:+.1f}"


def significance_markdown(comparisons):
    """Each comparison of evaluate_mlqa.compare_two as markdown: the means with B - A, its 95%
    confidence interval and p-values, then the MLQA pair differences with the significant ones
    starred. Empty when there is no comparison."""
    if not comparisons:
        return ""
    out = ["", "## Is the difference real? B - A with its 95% confidence interval", "",
           "Paired bootstrap over instances (an MLQA instance's pairs, and an XQuAD question's "
           "languages, are resampled together, so their correlation is kept): the difference of "
           "the means the tables report, its 95% percentile interval and the two-sided p-value "
           "of that same interval (p < 0.05 exactly when the 95% interval excludes 0; "
           "\"< 1e-4\": beyond the resolution of the resamples). "
           "Wilcoxon p: the authors' signed-rank test on per-example differences (XLT pairs "
           "selected before the test), for comparability only: it counts the correlated pairs "
           "of an instance as independent examples. Per-pair p-values are not corrected for "
           "the 49 comparisons.", ""]
    labels = {"gxlt": "G-XLT", "xlt": "XLT", "gxlt_cross": "G-XLT q!=c"}
    for c in comparisons:
        rows = []
        for group in [g for g in c if g not in ("a", "b")]:
            for key in [k for k in labels if k in c[group]["f1"]]:
                for metric in METRICS:
                    r = c[group][metric][key]
                    rows.append([_split_title(group), labels[key], METRICS[metric],
                        f"{r['mean_a']:.1f}", f"{r['mean_b']:.1f}", _signed(r["diff"]),
                        f"[{_signed(r['ci'][0])}, {_signed(r['ci'][1])}]",
                        _p(r["p"], r.get("resamples")),
                        _p(r.get("wilcoxon_p"))])
        out += [f"### {c['b']} (B) - {c['a']} (A)", "",
                _table(["data", "mean", "metric", "A", "B", "B - A", "95% CI", "p", "Wilcoxon p"],
                       rows), ""]
        for group in [g for g in c if g.startswith("mlqa-")]:
            pairs = c[group]["f1"]["pairs"]
            matrix = [[q] + [(_signed(pairs[f"{q}-{l}"]["diff"]) +
                              ("*" if significance.excludes_zero(pairs[f"{q}-{l}"]) else ""))
                             if f"{q}-{l}" in pairs else "-" for l in LANGUAGES] for q in LANGUAGES]
            out += [f"#### {_split_title(group)} F1 by pair, B - A (* 95% CI excludes 0)", "",
                    _table(["q \\ c"] + LANGUAGES, matrix), ""]
    return "\n".join(out).rstrip() + "\n"


def _same_model(metrics):
    """The model directory an evaluation's metrics.json names, resolved (None when absent): two
    evaluations of one model are one run, not two seeds."""
    model = metrics.get("model") if isinstance(metrics, dict) else None
    return os.path.realpath(model) if isinstance(model, str) else None


def seed_variance_markdown(rows):
    """Compared models whose runs differ only in --seed (rows: (name, metrics, configuration
    key or None)): mean±sd over the seeds and, per column, n = the runs evaluated there. Two
    evaluations of the same model directory count once (the first; a note says so): the same
    run is not a second seed. Empty without a group of two runs or more."""
    groups, first_of, repeats = {}, {}, []
    for name, metrics, config in rows:
        if config is None:
            continue
        model = _same_model(metrics)
        if model is not None and model in first_of:
            repeats.append(f"{name} evaluates the same model as {first_of[model]} ({model}): "
                           "counted once")
            continue
        first_of.setdefault(model, name)
        groups.setdefault(config, []).append((name, metrics))
    groups = [g for g in groups.values() if len(g) > 1]
    if not groups:
        return "".join(f"\n- note: {r}\n" for r in repeats)
    columns = [(s, key) for s in ("mlqa-dev", "mlqa-test") for key in ("gxlt", "xlt")
               if any(s in m for g in groups for _, m in g)]
    columns += [(s, "xlt") for s in ("xquad", "tydiqa") if any(s in m for g in groups for _, m in g)]

    def mean_of(metrics, split, key, metric):
        if split not in metrics:
            return None
        means = _split_means(metrics[split]) if split.startswith("mlqa-") else \
            {"xlt": _xlt(metrics, split)}
        return (means.get(key) or {}).get(metric)

    table = []
    for g in groups:
        cells = []
        for split, key in columns:
            stats = [[v for v in (mean_of(m, split, key, metric) for _, m in g) if v is not None]
                     for metric in METRICS]
            n = max(len(v) for v in stats)     # the runs evaluated on this split
            cells.append("/".join(f"{seed_summary(v)['mean']:.1f}±{seed_summary(v)['std']:.1f}"
                                  if len(v) > 1 else "-" for v in stats) + f" (n={n})")
        table.append([", ".join(name for name, _ in g), len(g)] + cells)
    header = ["runs (same configuration, other seeds)", "runs"] + [
        f"{_split_title(s)} {'G-XLT' if k == 'gxlt' else 'XLT'}" for s, k in columns]
    return "\n".join(["", "## Seed variance: mean±sd over runs that differ only in --seed", "",
                      "sd: the sample standard deviation (n - 1); n: the runs evaluated on that "
                      "data (sd needs two). A difference between two configurations smaller "
                      "than a few sd of either is within seed noise.", "",
                      _table(header, table), ""] + [f"- note: {r}" for r in repeats] +
                     [""] * bool(repeats))


# ----------------------------------------------------------------------------------------------
# Hyper-parameter sweeps (Sec. 7.2 and 7.3: Fig. 5, 6, 10, 11)

def run_mode(args):
    """The training variant of a distill.py run from its args.json: its "mode" entry (distill.py
    writes one), else from the flags: 'ce' (--ce-only), 'skd' (plain self-distillation),
    'skd-map' (--map-k), with '-noce' for --no-ce (Table 5)."""
    if args.get("mode"):
        return str(args["mode"])
    if args.get("ce_only"):
        return "ce"
    mode = "skd-map" if args.get("map_k") else "skd"
    return mode + ("-noce" if args.get("no_ce") else "")


def _final_dev_row(path, keep_best_epoch):
    """distill.py's dev_metrics.jsonl -> the MLQA-dev metrics of the epoch the run kept as its
    final model: the last epoch, or with --keep-best-epoch the first epoch of the highest G-XLT
    F1 (all 49 pairs, recomputed from the pairs)."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    for n, r in enumerate(rows, 1):      # every row distill.py appends has both: one without
        epoch = r.get("epoch") if isinstance(r, dict) else None     # is damage, not an epoch
        if isinstance(epoch, bool) or not isinstance(epoch, int) or \
                not isinstance(r.get("pairs"), dict):                 # to pass over silently
            raise InputError(f"{path}: row {n} is not an epoch's MLQA-dev scores (an integer "
                             "'epoch' and its 'pairs'): the file is damaged")
    if not rows:
        raise InputError(f"{path}: no epoch with MLQA-dev pairs")
    if keep_best_epoch:
        row = max(rows, key=lambda r: (summarize_pairs(r["pairs"])["gxlt"]["f1"] or 0.0,
                                       -r["epoch"]))
    else:
        row = max(rows, key=lambda r: r["epoch"])
    return {"mlqa-dev": {"pairs": row["pairs"]}, "epoch": row["epoch"]}


def _find_run_files(run_dir):
    """(metrics path, args.json path) of a sweep point; metrics: `<run>/metrics.json`, else
    `<run>/eval/metrics.json`, else distill.py's `<run>/dev_metrics.jsonl`."""
    for candidate in ("metrics.json", os.path.join("eval", "metrics.json"), "dev_metrics.jsonl"):
        metrics_path = os.path.join(run_dir, candidate)
        if os.path.isfile(metrics_path):
            break
    else:
        raise InputError(f"{run_dir}: no metrics.json nor dev_metrics.jsonl (run: python "
                         f"evaluate_mlqa.py --model {run_dir} --output-dir "
                         f"{os.path.join(run_dir, 'eval')})")
    args_path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(args_path) and metrics_path.endswith(".json"):
        args_path = _model_args_path(read_json(metrics_path)) or args_path
    if not os.path.isfile(args_path):
        raise InputError(f"{run_dir}: no args.json with the run's ntl and t")
    return metrics_path, args_path


def load_run(run_dir):
    """One sweep point: {"name", "dir", "mode", "ntl", "t", "seed", "selection", "config",
    "metrics"}. Metrics and args.json as _find_run_files finds them; "selection" names the
    epoch the run kept (the last, or the best on MLQA dev with --keep-best-epoch); "config" is
    every option of args.json but the seed (runs that differ only in their seed share it)."""
    metrics_path, args_path = _find_run_files(run_dir)
    args = read_json(args_path)
    if not isinstance(args, dict) or "ntl" not in args:
        raise InputError(f"{args_path}: missing field 'ntl'")
    keep_best = bool(args.get("keep_best_epoch"))
    if metrics_path.endswith(".jsonl"):
        metrics = _final_dev_row(metrics_path, keep_best)
    else:
        metrics = read_json(metrics_path)
    metrics = checked_metrics(metrics, metrics_path)
    if "mlqa-dev" not in metrics:
        raise InputError(f"{metrics_path}: missing field 'mlqa-dev' (evaluate on MLQA dev)")
    mode = run_mode(args)
    ntl = _args_number(args, "ntl", args_path, int)
    t = None if mode == "ce" or args.get("t") is None else \
        _args_number(args, "t", args_path, float)                            # ce: no temperature
    selection = "best epoch" if keep_best else "last epoch"
    if metrics.get("epoch") is not None:
        selection += f" ({metrics['epoch']})"
    name = os.path.basename(os.path.normpath(run_dir)) + as_authors_tag(metrics, args)
    return {"name": name, "dir": run_dir, "mode": mode,
            "ntl": ntl, "t": t, "seed": args.get("seed"), "selection": selection,
            "config": _config_key(args), "metrics": metrics,
            "run": os.path.realpath(os.path.dirname(os.path.abspath(args_path)))}


def _args_number(args, key, path, convert):
    """args.json's `key` as a finite number (`convert`: int or float); else one line naming it
    (a damaged args.json was a ValueError traceback, and a NaN temperature a silent table row)."""
    value = args[key]
    try:
        number = convert(value)
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"{path}: field '{key}' is {json.dumps(value)[:40]}, not a number") from None
    return number


SCORE_KEYS = ("f1", "exact_match")      # numbers (or null: absent) wherever a metrics.json has them


def checked_metrics(metrics, path):
    """`metrics` (read from `path`) if it has the shape evaluate_mlqa.py writes: an object whose
    scores are numbers; else one line naming the file, before any table or figure is made."""
    if not isinstance(metrics, dict):
        raise InputError(f"{path}: not an evaluation's metrics (expected a JSON object)")
    for group in ("mlqa-dev", "mlqa-test", "xquad", "tydiqa"):   # indexed by the tables
        value = metrics.get(group, {})
        pairs = value.get("pairs", {}) if isinstance(value, dict) else None
        if not isinstance(pairs, dict) or not all(isinstance(p, dict) for p in pairs.values()):
            raise InputError(f"{path}: not an evaluation's metrics ({group} is not its scores "
                             "per language pair)")
    todo = [(k, v) for k, v in metrics.items() if k not in ("options", "data", "notes")]
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            for key, inner in value.items():
                if key in SCORE_KEYS and inner is not None and not is_number(inner):
                    # (NaN too: a pair left out of a mean, silently)
                    raise InputError(f"{path}: not an evaluation's metrics ({where}.{key} is "
                                     f"{json.dumps(inner)[:40]}, not a number)")
                todo.append((f"{where}.{key}", inner))
    if metrics.get("hidden-knowledge"):
        _check_hidden_knowledge(metrics["hidden-knowledge"], path)
    return metrics


def _check_hidden_knowledge(hk, path):
    """Table 1's block as evaluate_mlqa.py writes it (k; per question language k counts, the
    examples not in the top k and all examples), else one line: its table indexes them."""
    def count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    k = hk.get("k") if isinstance(hk, dict) else None
    langs = hk.get("languages") if isinstance(hk, dict) else None
    ok = count(k) and k > 0 and isinstance(hk.get("criterion"), str) and \
        isinstance(langs, list) and all(isinstance(q, str) for q in langs) and \
        all(isinstance(hk.get(key), dict) for key in ("counts", "not_in_top_k", "n"))
    ok = ok and all(isinstance(hk["counts"].get(q), list) and len(hk["counts"][q]) == k and
                    all(map(count, hk["counts"][q])) and count(hk["not_in_top_k"].get(q)) and
                    count(hk["n"].get(q)) for q in langs)
    if not ok:
        raise InputError(f"{path}: not an evaluation's metrics (its hidden-knowledge counts are "
                         "not k counts per question language)")


def _config_key(args):
    """A run's configuration: its args.json without the seed (runs that differ only in --seed
    share it)."""
    return json.dumps({k: v for k, v in args.items() if k != "seed"}, sort_keys=True)


def as_authors_tag(metrics, args=None):
    """How a table names a run made with --as-authors: " [as-authors]" (trained and evaluated so),
    " [trained as-authors]" or " [evaluated as-authors]"; "" for neither. Training: `args` (a
    distill.py args.json) or the args.json / train_args.json of the model metrics.json names;
    evaluation: metrics.json's "options"."""
    options = metrics.get("options") if isinstance(metrics, dict) else None
    evaluated = isinstance(options, dict) and bool(options.get("as_authors"))
    model = metrics.get("model") if isinstance(metrics, dict) else None
    if args is None and isinstance(model, str):
        for name in ("args.json", "train_args.json"):
            path = os.path.join(model, name)
            if os.path.isfile(path):
                args = read_json(path)
                break
    trained = isinstance(args, dict) and bool(args.get("as_authors"))
    return {(True, True): " [as-authors]", (True, False): " [trained as-authors]",
            (False, True): " [evaluated as-authors]"}.get((trained, evaluated), "")


def _model_args_path(metrics):
    """args.json in the model directory an evaluation's metrics.json names, or None."""
    model = metrics.get("model") if isinstance(metrics, dict) else None
    path = os.path.join(model, "args.json") if isinstance(model, str) else None
    return path if path is not None and os.path.isfile(path) else None


def run_config(metrics):
    """The configuration of the distill.py run behind an evaluation (its args.json), or None for
    a model without one (e.g. mBERT-qa-en)."""
    path = _model_args_path(metrics)
    args = read_json(path) if path else None
    return _config_key(args) if isinstance(args, dict) else None


def _num(x):
    return "-" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


def _run_value(run, split, key, metric):
    """One run's MLQA mean (key: gxlt, xlt) on a split, or None when not evaluated there."""
    if split not in run["metrics"]:
        return None
    return _split_means(run["metrics"][split])[key].get(metric)


def seed_groups(runs):
    """Runs that differ only in --seed, together (same args.json but for the seed), sorted by
    mode, ntl, t: [[run, ...], ...]."""
    groups = {}
    for r in runs:
        groups.setdefault(r["config"], []).append(r)
    order = lambda g: (g[0]["mode"], g[0]["ntl"], -1 if g[0]["t"] is None else g[0]["t"],  # noqa
                       g[0]["name"])
    return sorted((sorted(g, key=lambda r: (r["seed"] is None, r["seed"] or 0, r["name"]))
                   for g in groups.values()), key=order)


def _group_stat(group, split, key, metric):
    """seed_summary of one mean over a group's runs (None: no run evaluated there)."""
    values = [v for v in (_run_value(r, split, key, metric) for r in group) if v is not None]
    return seed_summary(values) if values else None


def _fmt_seeds(group, split, key):
    """'F1/EM' of a group; with several seeds 'mean±sd' each (the seeds are their own column;
    '(n=K)' when only K of them were evaluated on this split)."""
    stats = [_group_stat(group, split, key, m) for m in METRICS]
    if all(st is None for st in stats):
        return "-"
    n = max(st["n"] for st in stats if st is not None)
    return "/".join("-" if st is None else f"{st['mean']:.1f}" +
                    ("" if st["std"] is None else f"±{st['std']:.1f}") for st in stats) + \
        (f" (n={n})" if n < len(group) else "")


def sweep_markdown(runs):
    """Every run; then per configuration (runs that differ only in --seed merged: mean±sd over
    the seeds, n) and the best configuration per mode on MLQA-dev G-XLT F1 (the mean over its
    seeds): the model selection of Sec. 5.2 that gives Table 2's rows."""
    groups = seed_groups(runs)
    splits = ["mlqa-dev"] + ["mlqa-test"] * any("mlqa-test" in r["metrics"] for r in runs)
    scores = [f"{_split_title(s)} {label}" for s in splits for label in ("G-XLT", "XLT")]
    per_run = [[r["name"], r["mode"], r["ntl"], _num(r["t"]), _num(r["seed"]), r["selection"]] +
               [_fmt(_split_means(r["metrics"][s]).get(key)) if s in r["metrics"] else "-"
                for s in splits for key in ("gxlt", "xlt")]
               for g in groups for r in g]

    def group_row(g):
        names = g[0]["name"] if len(g) == 1 else f"{g[0]['name']} (+{len(g) - 1})"
        return [names, g[0]["mode"], g[0]["ntl"], _num(g[0]["t"]), len(g),
                g[0]["selection"].split(" (")[0]] + \
            [_fmt_seeds(g, s, key) for s in splits for key in ("gxlt", "xlt")]

    best = {}
    for g in groups:
        st = _group_stat(g, "mlqa-dev", "gxlt", "f1")
        if st is not None and (g[0]["mode"] not in best or st["mean"] > best[g[0]["mode"]][0]):
            best[g[0]["mode"]] = (st["mean"], g)
    group_header = ["configuration", "mode", "ntl", "t", "seeds", "final model"] + scores
    out = ["# Sweep summary (F1/EM)", "",
           "G-XLT: mean over all 49 MLQA pairs; XLT: the 7 same-language pairs. Final model: the "
           "epoch each run kept (the last, or the best on MLQA dev with --keep-best-epoch).", "",
           _table(["run", "mode", "ntl", "t", "seed", "final model"] + scores, per_run), ""]
    if any(len(g) > 1 for g in groups):
        out += ["## Per configuration: mean±sd over seeds", "",
                "Runs whose args.json differ only in the seed; sd is the sample standard "
                "deviation (n - 1).", "", _table(group_header, [group_row(g) for g in groups]), ""]
    out += ["## Best on MLQA-dev G-XLT F1, per mode (Sec. 5.2 model selection; Table 2)", "",
            _table(group_header, [group_row(best[m][1]) for m in sorted(best)]), ""]
    return "\n".join(out)


def _fig5_t(runs, mode):
    """The temperature Fig. 5 holds fixed for a mode: the most common one among its runs; on a
    tie, that of the mode's best run on MLQA-dev G-XLT F1."""
    sel = [r for r in runs if r["mode"] == mode and r["t"] is not None]
    if not sel:
        return None
    ts = [r["t"] for r in sel]
    top = max(ts.count(t) for t in ts)
    tied = [r for r in sel if ts.count(r["t"]) == top]
    return max(tied, key=lambda r: _run_value(r, "mlqa-dev", "gxlt", "f1") or 0.0)["t"]


def ntl_lines(runs, key, metric="f1", t=None):
    """The lines of one panel of Fig. 5 / 11 (key: gxlt or xlt): [(label, ntls, means, sds)], one
    per mode at temperature t (default: per mode, see _fig5_t; the ce mode has no temperature).
    Several seeds of a point: their mean and sample standard deviation (0.0 for one seed)."""
    lines = []
    for mode in sorted({r["mode"] for r in runs}):
        mode_t = _fig5_t(runs, mode)
        if t is not None and mode_t is not None:
            mode_t = float(t)
        by_ntl = {}
        for r in runs:
            value = _run_value(r, "mlqa-dev", key, metric)
            if r["mode"] == mode and r["t"] == mode_t and value is not None:
                by_ntl.setdefault(r["ntl"], []).append(value)
        if by_ntl:
            xs = sorted(by_ntl)
            stats = [seed_summary(by_ntl[x]) for x in xs]
            lines.append((mode if mode_t is None else f"{mode} (t={mode_t:g})", xs,
                          [st["mean"] for st in stats], [st["std"] or 0.0 for st in stats]))
    return lines


def ntl_figure(runs, path, metric="f1", t=None):
    """Fig. 5 (F1) / Fig. 11 (EM): MLQA-dev G-XLT and XLT against ntl, one line per mode
    (ntl_lines), the standard deviation over seeds as error bars."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 2, FIGSIZE[1]), dpi=DPI)
    for ax, key, label in ((axes[0], "gxlt", "G-XLT"), (axes[1], "xlt", "XLT")):
        for line_label, xs, means, sds in ntl_lines(runs, key, metric, t):
            ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=line_label)
        ax.set_xlabel("number of target languages ntl")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(f"MLQA-dev {label} {METRICS[metric]}")
        ax.set_title(f"{label} {METRICS[metric]} vs ntl (error bars: sd over seeds)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def temperature_ntl_matrix(runs, mode, metric="f1"):
    """(ts, ntls, matrix[t, ntl]) of MLQA-dev G-XLT for one mode (the mean over seeds); NaN
    where no run."""
    sel = [r for r in runs if r["mode"] == mode and r["t"] is not None]
    ts = sorted({r["t"] for r in sel})
    ntls = sorted({r["ntl"] for r in sel})
    cells = {}
    for r in sel:
        value = _run_value(r, "mlqa-dev", "gxlt", metric)
        if value is not None:
            cells.setdefault((ts.index(r["t"]), ntls.index(r["ntl"])), []).append(value)
    m = np.full((len(ts), len(ntls)), np.nan)
    for (i, j), values in cells.items():
        m[i, j] = float(np.mean(values))
    return ts, ntls, m


def sweep_report(run_dirs, out_dir, fig5_t=None):
    """Load the runs, write out_dir/sweep.md, Fig. 5 and 11 (fig5_ntl_f1.png, fig11_ntl_em.png)
    and per distillation mode Fig. 6 and 10 (fig6_t_ntl_f1_<mode>.png, fig10_t_ntl_em_<mode>.png).
    Returns (markdown, [paths])."""
    if not run_dirs:
        raise InputError("--sweep: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    seen = {}
    for r in runs:    # one run given twice (runs/X and runs/X/eval, a link) is not two seeds
        if r["run"] in seen:
            raise InputError(f"--sweep: {seen[r['run']]} and {r['dir']} are the same run "
                             f"({r['run']}); give each run once")
        seen[r["run"]] = r["dir"]
    held = sorted({r["t"] for r in runs if r["t"] is not None})
    if fig5_t is not None and float(fig5_t) not in held:           # else an empty figure
        raise InputError(f"--fig5-t {fig5_t:g}: no distillation run at that temperature "
                         f"(the runs have t = {', '.join(f'{t:g}' for t in held) or 'none'})")
    text = sweep_markdown(runs)
    paths = [os.path.join(out_dir, "sweep.md")]
    atomic_write_text(paths[0], text)
    paths.append(ntl_figure(runs, os.path.join(out_dir, "fig5_ntl_f1.png"), "f1", fig5_t))
    paths.append(ntl_figure(runs, os.path.join(out_dir, "fig11_ntl_em.png"), "exact_match", fig5_t))
    for mode in sorted({r["mode"] for r in runs if r["mode"] != "ce" and r["t"] is not None}):
        for metric, fig, stem in (("f1", "fig6", "f1"), ("exact_match", "fig10", "em")):
            ts, ntls, m = temperature_ntl_matrix(runs, mode, metric)
            paths.append(heatmap_figure(
                [(f"MLQA-dev G-XLT {METRICS[metric]}, {mode}", m)],
                os.path.join(out_dir, f"{fig}_t_ntl_{stem}_{mode}.png"),
                row_labels=[f"{t:g}" for t in ts], col_labels=ntls,
                xlabel="number of target languages ntl", ylabel="temperature t",
                cbar_label=f"MLQA-dev G-XLT {METRICS[metric]}"))
    return text, paths


if __name__ == "__main__":
    not_a_script(__file__)
