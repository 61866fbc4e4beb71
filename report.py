"""Tables and figures of the paper from metrics dictionaries (no model, no data set here).

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
  Fig. 5 / Fig. 11  MLQA-dev G-XLT and XLT F1 / EM against ntl, one line per mode   sweep_report
  Fig. 6 / Fig. 10  MLQA-dev G-XLT F1 / EM over temperature t x ntl, one per mode   sweep_report

All averages are unweighted means over language pairs, as the paper reports them (XLT: the 7
pairs with q == c; G-XLT: the 42 pairs with q != c). Every file is written under a temporary name
and renamed into place.
"""
import math
import os
import tempfile

import numpy as np

from common import (LANGUAGES, TYDIQA_ZERO_SHOT, XQUAD_ZERO_SHOT, InputError, atomic_write_text,
                    read_json)

METRICS = {"f1": "F1", "exact_match": "EM"}
FIGSIZE = (6.0, 5.0)  # inches per heat-map panel; PNG pixels = FIGSIZE * DPI
DPI = 100
HIDDEN_KNOWLEDGE_K = 10


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
    """XLT (q == c), G-XLT (q != c) and per-context-language means (Table 3: the mean over the
    question languages, the same-language pair included) of both metrics. A mean over no pair is
    None."""
    out = {"xlt": {}, "gxlt": {}, "per_context": {c: {} for c in languages}}
    for metric in METRICS:
        m = pair_matrix(pairs, metric, languages)
        diagonal = np.eye(len(languages), dtype=bool)
        out["xlt"][metric] = _mean(m[diagonal].tolist())
        out["gxlt"][metric] = _mean(m[~diagonal].tolist())
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
    """Write a matplotlib figure as PNG atomically (temporary name, then rename)."""
    plt = pyplot()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def heatmap_figure(panels, path, row_labels=LANGUAGES, col_labels=LANGUAGES,
                   xlabel="context language", ylabel="question language", diverging=False,
                   fmt="{:.1f}", suptitle=None):
    """One PNG with one annotated heat map per panel, side by side.

    panels: list of (title, 2-D array); NaN cells stay blank. Each panel has its own colour range
    (the paper's Fig. 6: "minimum and maximum values are relative to each figure"); with
    diverging, the range is symmetric around 0 (red = worse, green = better: Fig. 3 and 9).
    """
    plt = pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(FIGSIZE[0] * n, FIGSIZE[1]), dpi=DPI, squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels):
        matrix = np.asarray(matrix, dtype=float)
        finite = matrix[np.isfinite(matrix)]
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
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax,
                          aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
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
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return save_figure(fig, path)


def _split_title(split):
    return {"mlqa-dev": "MLQA-dev", "mlqa-test": "MLQA-test"}.get(split, split)


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
        paths.append(heatmap_figure(panels, os.path.join(out_dir, f"{fig}_mlqa_{stem}.png")))
    return paths


def difference_matrix(pairs, baseline_pairs, metric="f1"):
    """model - baseline per (question, context) pair; NaN where either lacks the pair."""
    return pair_matrix(pairs, metric) - pair_matrix(baseline_pairs, metric)


def difference_heatmaps(metrics, baseline, out_dir, splits=("mlqa-dev", "mlqa-test"),
                        name="model", baseline_name="baseline"):
    """Fig. 3 (F1) and Fig. 9 (EM): model minus baseline, one panel per split both have.

    Returns the paths written: out_dir/fig3_mlqa_f1_diff.png, out_dir/fig9_mlqa_em_diff.png."""
    present = [s for s in splits if s in metrics and s in baseline]
    if not present:
        return []
    paths = []
    for metric, fig, stem in (("f1", "fig3", "f1"), ("exact_match", "fig9", "em")):
        panels = [(f"{_split_title(s)} {METRICS[metric]}: {name} - {baseline_name}",
                   difference_matrix(metrics[s]["pairs"], baseline[s]["pairs"], metric))
                  for s in present]
        paths.append(heatmap_figure(panels, os.path.join(out_dir, f"{fig}_mlqa_{stem}_diff.png"),
                                    diverging=True, fmt="{:+.1f}"))
    return paths


# ----------------------------------------------------------------------------------------------
# Hidden knowledge in the top-k answers (Sec. 4.1, Table 1)

def first_correct_rank(candidates, gold_answers, answer_lang, criterion="em", f1_threshold=50.0):
    """1-based rank of the first candidate that is correct, or None.

    Correct = exact match with some gold answer (criterion "em"), or, with criterion "f1", a
    token F1 >= f1_threshold (in percent, like the reported scores) with some gold answer; both
    under the official MLQA rules of the answer (context) language ("squad": SQuAD v1.1 rules).
    """
    from evaluate_mlqa import exact_match_score, f1_score  # late: evaluate_mlqa imports report
    if criterion not in ("em", "f1"):
        raise InputError(f"hidden knowledge: unknown criterion '{criterion}' (em or f1)")
    for rank, text in enumerate(candidates, start=1):
        if criterion == "em":
            ok = any(exact_match_score(text, g, answer_lang) for g in gold_answers)
        else:
            ok = any(100.0 * f1_score(text, g, answer_lang) >= f1_threshold for g in gold_answers)
        if ok:
            return rank
    return None


def hidden_knowledge_counts(records, k=HIDDEN_KNOWLEDGE_K, criterion="em", f1_threshold=50.0,
                            languages=LANGUAGES):
    """Table 1: per question language, how many examples have their FIRST correct answer at
    rank r = 1..k of the model's n-best list.

    records: iterable of {"question_lang", "context_lang", "nbest": [answer texts, rank 1
    first], "answers": [gold texts]}; the answer language (scoring rules) is the context
    language. Returns {"k", "criterion", "f1_threshold" (criterion f1 only), "languages",
    "counts": {q: [count at rank 1, ..., rank k]}, "n": {q: examples}, "not_in_top_k": {q: n}}.
    """
    counts, totals, missing = {}, {}, {}
    for rec in records:
        q = rec["question_lang"]
        counts.setdefault(q, [0] * k)
        totals[q] = totals.get(q, 0) + 1
        rank = first_correct_rank(rec["nbest"][:k], rec["answers"], rec["context_lang"],
                                  criterion, f1_threshold)
        if rank is None:
            missing[q] = missing.get(q, 0) + 1
        else:
            counts[q][rank - 1] += 1
    order = [q for q in languages if q in counts] + sorted(q for q in counts if q not in languages)
    out = {"k": k, "criterion": criterion, "languages": order,
           "counts": {q: counts[q] for q in order}, "n": {q: totals[q] for q in order},
           "not_in_top_k": {q: missing.get(q, 0) for q in order}}
    if criterion == "f1":
        out["f1_threshold"] = f1_threshold
    return out


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
    """xlt / gxlt / per_context of an MLQA split, recomputed from the pairs when absent."""
    derived = summarize_pairs(split_metrics.get("pairs", {}))
    return {key: split_metrics.get(key) or derived[key] for key in derived}


def _pair_langs(pairs, default):
    present = sorted({key.split("-")[0] for key in pairs})
    return [l for l in default if l in present] + [l for l in present if l not in default]


def summary_markdown(runs, title="Evaluation summary"):
    """A markdown report mirroring the paper's tables, one row per model.

    runs: list of (name, metrics) where metrics is what `evaluate_mlqa.py --model` writes. Cells
    are 'F1/EM'; '-' where a model was not evaluated on that data."""
    runs = list(runs)
    out = [f"# {title}", ""]
    splits = [s for s in ("mlqa-dev", "mlqa-test") if any(s in m for _, m in runs)]
    has_xquad = any("xquad" in m for _, m in runs)
    has_tydiqa = any("tydiqa" in m for _, m in runs)

    def xlt(m, key):
        if key not in m:
            return None
        return m[key].get("xlt") or same_language_summary(m[key]["pairs"])

    if splits or has_xquad or has_tydiqa:
        header, rows = ["model"], []
        for s in splits:
            header += [f"{_split_title(s)} G-XLT", f"{_split_title(s)} XLT"]
        header += ["XQuAD XLT"] * has_xquad + ["TyDiQA-GoldP XLT"] * has_tydiqa
        for name, m in runs:
            row = [name]
            for s in splits:
                means = _split_means(m[s]) if s in m else {}
                row += [_fmt(means.get("gxlt")), _fmt(means.get("xlt"))]
            row += [_fmt(xlt(m, "xquad"))] * has_xquad + [_fmt(xlt(m, "tydiqa"))] * has_tydiqa
            rows.append(row)
        out += ["## Averages, F1/EM (Tables 2 and 5)", "",
                "G-XLT: mean over the 42 MLQA pairs with question language != context language; "
                "XLT: mean over the same-language pairs.", "", _table(header, rows), ""]

    for s in splits:
        rows = [[name] + [_fmt(_split_means(m[s])["per_context"].get(c)) if s in m else "-"
                          for c in LANGUAGES] for name, m in runs]
        out += [f"## {_split_title(s)} per context language, F1/EM (Table 3)", "",
                "Mean over the 7 question languages for each context (answer) language.", "",
                _table(["model"] + LANGUAGES, rows), ""]

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

    for key, label, default in (("xquad", "XQuAD", XQUAD_ZERO_SHOT),
                                ("tydiqa", "TyDiQA-GoldP", TYDIQA_ZERO_SHOT)):
        if not any(key in m for _, m in runs):
            continue
        langs = []
        for _, m in runs:
            for l in _pair_langs(m.get(key, {}).get("pairs", {}), default):
                if l not in langs:
                    langs.append(l)
        rows = [[name, _fmt(xlt(m, key))] +
                [_fmt(m[key]["pairs"].get(f"{l}-{l}")) if key in m else "-" for l in langs]
                for name, m in runs]
        out += [f"## {label} zero-shot, F1/EM (Table 4)", "", _table(["model", "XLT"] + langs, rows),
                ""]

    for name, m in runs:
        hk = m.get("hidden-knowledge")
        if not hk:
            continue
        langs = hk["languages"]
        rows = [[r + 1] + [hk["counts"][q][r] for q in langs] for r in range(hk["k"])]
        rows.append([f"not in top {hk['k']}"] + [hk["not_in_top_k"][q] for q in langs])
        rows.append(["examples"] + [hk["n"][q] for q in langs])
        rule = ("exact match" if hk["criterion"] == "em"
                else f"F1 >= {hk.get('f1_threshold')}")
        out += [f"## Hidden knowledge on {_split_title(hk.get('split', 'mlqa-dev'))}, {name} "
                "(Table 1)", "",
                f"Examples whose first correct answer ({rule}) is at rank r of the top "
                f"{hk['k']}, by question language.", "",
                _table(["rank"] + langs, rows), ""]

    others = [(name, key, v) for name, m in runs for key, v in m.items()
              if isinstance(v, dict) and "f1" in v and "pairs" not in v]
    if others:
        rows = [[name, key, _fmt(v), v.get("n", "-")] for name, key, v in others]
        out += ["## Other data sets, F1/EM", "", _table(["model", "data set", "F1/EM", "n"], rows),
                ""]
    return "\n".join(out).rstrip() + "\n"


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


def _best_dev_row(path):
    """distill.py's dev_metrics.jsonl -> the MLQA-dev metrics of its best-on-dev epoch (the
    model it keeps: the last row marked best, else the highest G-XLT F1)."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    rows = [r for r in rows if isinstance(r, dict) and "pairs" in r]
    if not rows:
        raise InputError(f"{path}: no epoch with MLQA-dev pairs")
    marked = [r for r in rows if r.get("best")]
    row = marked[-1] if marked else max(rows, key=lambda r: (r.get("gxlt") or {}).get("f1") or 0)
    return {"mlqa-dev": {key: row[key] for key in ("pairs", "xlt", "gxlt") if key in row},
            "epoch": row.get("epoch")}


def load_run(run_dir):
    """One sweep point: {"name", "dir", "mode", "ntl", "t", "metrics"}.

    metrics: `<run>/metrics.json`, else `<run>/eval/metrics.json` (evaluate_mlqa.py --model RUN
    --output-dir RUN/eval), else the best epoch of distill.py's own `<run>/dev_metrics.jsonl`
    (MLQA-dev only). Configuration: `<run>/args.json` (distill.py writes it: ntl, t, mode), else
    args.json in the model directory named by metrics.json's "model" entry."""
    metrics_path = None
    for candidate in ("metrics.json", os.path.join("eval", "metrics.json"), "dev_metrics.jsonl"):
        if os.path.isfile(os.path.join(run_dir, candidate)):
            metrics_path = os.path.join(run_dir, candidate)
            break
    if metrics_path is None:
        raise InputError(f"{run_dir}: no metrics.json nor dev_metrics.jsonl (run: python "
                         f"evaluate_mlqa.py --model {run_dir} --output-dir "
                         f"{os.path.join(run_dir, 'eval')})")
    if metrics_path.endswith(".jsonl"):
        metrics = _best_dev_row(metrics_path)
    else:
        metrics = read_json(metrics_path)
    if not isinstance(metrics, dict):
        raise InputError(f"{metrics_path}: expected a JSON object")
    args_path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(args_path) and isinstance(metrics.get("model"), str):
        args_path = os.path.join(metrics["model"], "args.json")
    if not os.path.isfile(args_path):
        raise InputError(f"{run_dir}: no args.json with the run's ntl and t")
    args = read_json(args_path)
    if not isinstance(args, dict) or "ntl" not in args:
        raise InputError(f"{args_path}: missing field 'ntl'")
    if "mlqa-dev" not in metrics:
        raise InputError(f"{metrics_path}: missing field 'mlqa-dev' (evaluate on MLQA dev)")
    t = args.get("t")
    mode = run_mode(args)
    if mode == "ce" or t is None:  # cross-entropy only: the temperature plays no part
        t = None
    return {"name": os.path.basename(os.path.normpath(run_dir)), "dir": run_dir,
            "mode": mode, "ntl": int(args["ntl"]),
            "t": None if t is None else float(t), "metrics": metrics}


def _num(x):
    return "-" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


def sweep_markdown(runs):
    """Every run (sorted by mode, ntl, t) and the best on MLQA-dev G-XLT F1 per mode (the model
    selection of Sec. 5.2)."""
    runs = sorted(runs, key=lambda r: (r["mode"], r["ntl"], -1 if r["t"] is None else r["t"],
                                       r["name"]))
    has_test = any("mlqa-test" in r["metrics"] for r in runs)
    header = ["run", "mode", "ntl", "t", "MLQA-dev G-XLT", "MLQA-dev XLT"]
    header += ["MLQA-test G-XLT", "MLQA-test XLT"] * has_test

    def row(r):
        dev = _split_means(r["metrics"]["mlqa-dev"])
        cells = [r["name"], r["mode"], r["ntl"], _num(r["t"]), _fmt(dev["gxlt"]), _fmt(dev["xlt"])]
        if has_test:
            test = _split_means(r["metrics"]["mlqa-test"]) if "mlqa-test" in r["metrics"] else {}
            cells += [_fmt(test.get("gxlt")), _fmt(test.get("xlt"))]
        return cells

    best = {}
    for r in runs:
        f1 = _split_means(r["metrics"]["mlqa-dev"])["gxlt"]["f1"]
        if f1 is not None and (r["mode"] not in best or f1 > best[r["mode"]][0]):
            best[r["mode"]] = (f1, r)
    out = ["# Sweep summary (F1/EM)", "", _table(header, [row(r) for r in runs]), "",
           "## Best on MLQA-dev G-XLT F1, per mode (Sec. 5.2 model selection; Table 2)", "",
           _table(header, [row(best[m][1]) for m in sorted(best)]), ""]
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
    return max(tied, key=lambda r: _split_means(r["metrics"]["mlqa-dev"])["gxlt"]["f1"] or 0.0)["t"]


def ntl_figure(runs, path, metric="f1", t=None):
    """Fig. 5 (F1) / Fig. 11 (EM): MLQA-dev G-XLT and XLT against ntl, one line per mode, at
    temperature t (default: per mode, see _fig5_t; the ce mode has no temperature)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 2, FIGSIZE[1]), dpi=DPI)
    for ax, key, label in ((axes[0], "gxlt", "G-XLT"), (axes[1], "xlt", "XLT")):
        for mode in sorted({r["mode"] for r in runs}):
            mode_t = _fig5_t(runs, mode)
            if t is not None and mode_t is not None:
                mode_t = float(t)
            points = sorted((r["ntl"], _split_means(r["metrics"]["mlqa-dev"])[key][metric])
                            for r in runs if r["mode"] == mode and r["t"] == mode_t)
            points = [(x, y) for x, y in points if y is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o",
                        label=mode if mode_t is None else f"{mode} (t={mode_t:g})")
        ax.set_xlabel("number of target languages ntl")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(f"MLQA-dev {label} {METRICS[metric]}")
        ax.set_title(f"{label} {METRICS[metric]} vs ntl")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def temperature_ntl_matrix(runs, mode, metric="f1"):
    """(ts, ntls, matrix[t, ntl]) of MLQA-dev G-XLT for one mode; NaN where no run."""
    sel = [r for r in runs if r["mode"] == mode and r["t"] is not None]
    ts = sorted({r["t"] for r in sel})
    ntls = sorted({r["ntl"] for r in sel})
    m = np.full((len(ts), len(ntls)), np.nan)
    for r in sel:
        value = _split_means(r["metrics"]["mlqa-dev"])["gxlt"][metric]
        if value is not None:
            m[ts.index(r["t"]), ntls.index(r["ntl"])] = value
    return ts, ntls, m


def sweep_report(run_dirs, out_dir, fig5_t=None):
    """Load the runs, write out_dir/sweep.md, Fig. 5 and 11 (fig5_ntl_f1.png, fig11_ntl_em.png)
    and per distillation mode Fig. 6 and 10 (fig6_t_ntl_f1_<mode>.png, fig10_t_ntl_em_<mode>.png).
    Returns (markdown, [paths])."""
    if not run_dirs:
        raise InputError("--sweep: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
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
                xlabel="number of target languages ntl", ylabel="temperature t"))
    return text, paths
