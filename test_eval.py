"""Tests of evaluation and analysis (report.py, evaluate_mlqa.py --model / --sweep)."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import report

EVAL_HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_XQUAD_DIR = os.path.join(EVAL_HERE, "data", "xquad")
EVAL_LANGS = ["en", "es", "de", "ar", "vi", "hi", "zh"]


def _eval_png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])  # width, height


def _eval_fake_pairs(offset=0.0):
    """f1 = 10*i + j + offset and EM = f1 / 2 for question i, context j."""
    return {f"{q}-{c}": {"f1": 10.0 * i + j + offset, "exact_match": (10.0 * i + j + offset) / 2,
                         "n": 5}
            for i, q in enumerate(EVAL_LANGS) for j, c in enumerate(EVAL_LANGS)}


# ---------------------------------------------------------------- report.py: tables and figures

def test_eval_pair_means_xlt_gxlt_per_context():
    pairs = _eval_fake_pairs()
    s = report.summarize_pairs(pairs)
    diag = [11.0 * i for i in range(7)]
    off = [10.0 * i + j for i in range(7) for j in range(7) if i != j]
    assert s["xlt"]["f1"] == pytest.approx(sum(diag) / 7)
    assert s["gxlt"]["f1"] == pytest.approx(sum(off) / 42)
    assert s["gxlt"]["exact_match"] == pytest.approx(sum(off) / 84)
    # Table 3: mean over the question languages for each context language (column means)
    for j, c in enumerate(EVAL_LANGS):
        assert s["per_context"][c]["f1"] == pytest.approx(sum(10.0 * i + j for i in range(7)) / 7)
    m = report.pair_matrix(pairs, "f1")
    assert m[3, 5] == 35.0  # row = question language ar, column = context language hi
    del pairs["ar-hi"]
    assert np.isnan(report.pair_matrix(pairs, "f1")[3, 5])
    assert report.summarize_pairs(pairs)["gxlt"]["f1"] == pytest.approx((sum(off) - 35) / 41)


def test_eval_heatmaps_are_pngs_of_the_right_size(tmp_path):
    metrics = {"mlqa-dev": {"pairs": _eval_fake_pairs()}, "mlqa-test": {"pairs": _eval_fake_pairs(1)}}
    w, h = int(report.FIGSIZE[0] * report.DPI), int(report.FIGSIZE[1] * report.DPI)
    paths = report.pair_heatmaps(metrics, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["fig1_mlqa_f1.png", "fig8_mlqa_em.png"]
    for p in paths:
        assert _eval_png_size(p) == (2 * w, h)  # one panel per split, dev and test
    baseline = {"mlqa-dev": {"pairs": _eval_fake_pairs(-5)}}
    diff = report.difference_heatmaps(metrics, baseline, str(tmp_path / "d"))
    assert sorted(os.path.basename(p) for p in diff) == ["fig3_mlqa_f1_diff.png",
                                                        "fig9_mlqa_em_diff.png"]
    for p in diff:
        assert _eval_png_size(p) == (w, h)  # only dev is in both
    dm = report.difference_matrix(metrics["mlqa-dev"]["pairs"], baseline["mlqa-dev"]["pairs"])
    assert np.allclose(dm, 5.0)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_eval_hidden_knowledge_counts_by_hand():
    recs = [
        # en question, en context: rank 1 after normalisation ("The" is an English article)
        {"question_lang": "en", "context_lang": "en", "nbest": ["The Panthers.", "x"],
         "answers": ["panthers"]},
        # en question, de context: first correct at rank 3 ("die" is a German article)
        {"question_lang": "en", "context_lang": "de", "nbest": ["a", "b", "die Katze", "Katze"],
         "answers": ["Katze"]},
        # en question: never correct within the list
        {"question_lang": "en", "context_lang": "es", "nbest": ["uno", "dos"], "answers": ["tres"]},
        # zh question, en context: rank 2 under EM; under F1>=50 "big red dog" already at rank 1
        {"question_lang": "zh", "context_lang": "en", "nbest": ["red dog barks", "red dog"],
         "answers": ["red dog"]},
        # zh question, ar context: the official rules delete every "ال": rank 1
        {"question_lang": "zh", "context_lang": "ar", "nbest": ["الكتاب"], "answers": ["كتاب"]},
        # a correct answer at rank 11 is outside the top 10
        {"question_lang": "zh", "context_lang": "zh", "nbest": ["错"] * 10 + ["对"],
         "answers": ["对"]},
    ]
    hk = report.hidden_knowledge_counts(recs, k=10)
    assert hk["languages"] == ["en", "zh"]
    assert hk["counts"]["en"] == [1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert hk["counts"]["zh"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert hk["n"] == {"en": 3, "zh": 3}
    assert hk["not_in_top_k"] == {"en": 1, "zh": 1}
    f1 = report.hidden_knowledge_counts(recs, k=10, criterion="f1", f1_threshold=50.0)
    assert f1["counts"]["zh"][:2] == [2, 0]  # "red dog barks" has F1 0.8 with "red dog"
    assert f1["counts"]["en"][:3] == [1, 0, 1]
    assert f1["f1_threshold"] == 50.0
    strict = report.hidden_knowledge_counts(recs, k=10, criterion="f1", f1_threshold=90.0)
    assert strict["counts"]["zh"][:2] == [1, 1]


def test_eval_summary_markdown_mirrors_tables():
    metrics = {"mlqa-dev": {"pairs": _eval_fake_pairs()},
               "xquad": {"pairs": {"el-el": {"f1": 60.0, "exact_match": 40.0, "n": 3},
                                   "ru-ru": {"f1": 70.0, "exact_match": 50.0, "n": 3}}},
               "hidden-knowledge": {"k": 2, "criterion": "em", "languages": ["en"],
                                    "counts": {"en": [7, 3]}, "n": {"en": 12},
                                    "not_in_top_k": {"en": 2}},
               "mydata": {"f1": 12.5, "exact_match": 2.5, "n": 4}}
    text = report.summary_markdown([("model-a", metrics)])
    s = report.summarize_pairs(metrics["mlqa-dev"]["pairs"])
    row = f"| model-a | {s['gxlt']['f1']:.1f}/{s['gxlt']['exact_match']:.1f} | " \
          f"{s['xlt']['f1']:.1f}/{s['xlt']['exact_match']:.1f} | 65.0/45.0 |"
    assert row in text  # Tables 2/5: MLQA-dev G-XLT, XLT, XQuAD XLT
    assert "| model-a | 65.0/45.0 | 60.0/40.0 | 70.0/50.0 |" in text  # Table 4
    assert "| 1 | 7 |" in text and "| 2 | 3 |" in text  # Table 1
    assert "| model-a | mydata | 12.5/2.5 | 4 |" in text
    assert "| ar | 30.0 | 31.0 | 32.0 | 33.0 | 34.0 | 35.0 | 36.0 |" in text  # F1 matrix row


def _eval_fake_run(root, name, mode_args, ntl, t, gxlt_f1, xlt_f1):
    d = root / name
    d.mkdir()
    pairs = {f"{q}-{c}": {"f1": xlt_f1 if q == c else gxlt_f1,
                          "exact_match": (xlt_f1 if q == c else gxlt_f1) / 2, "n": 1}
             for q in EVAL_LANGS for c in EVAL_LANGS}
    (d / "metrics.json").write_text(json.dumps({"mlqa-dev": {"pairs": pairs}}))
    (d / "args.json").write_text(json.dumps(dict(mode_args, ntl=ntl, t=t)))
    return str(d)


def _eval_sweep_dirs(root):
    runs = []
    for ntl in (1, 3, 5):
        for t in (1.0, 2.0):
            runs.append(_eval_fake_run(root, f"skd-n{ntl}-t{t:g}", {"map_k": False}, ntl, t,
                                       40 + ntl + t, 60 - ntl))
            runs.append(_eval_fake_run(root, f"map-n{ntl}-t{t:g}", {"map_k": True}, ntl, t,
                                       41 + ntl + t, 61 - ntl))
        runs.append(_eval_fake_run(root, f"ce-n{ntl}", {"ce_only": True}, ntl, 2.0, 39 + ntl, 58))
    return runs


def test_eval_sweep_report_table_and_figures(tmp_path):
    runs = _eval_sweep_dirs(tmp_path)
    out = tmp_path / "out"
    text, paths = report.sweep_report(runs, str(out))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["sweep.md", "fig5_ntl_f1.png", "fig11_ntl_em.png",
                            "fig6_t_ntl_f1_skd.png", "fig10_t_ntl_em_skd.png",
                            "fig6_t_ntl_f1_skd-map.png", "fig10_t_ntl_em_skd-map.png"])
    w, h = int(report.FIGSIZE[0] * report.DPI), int(report.FIGSIZE[1] * report.DPI)
    assert _eval_png_size(str(out / "fig5_ntl_f1.png")) == (2 * w, h)
    assert _eval_png_size(str(out / "fig6_t_ntl_f1_skd.png")) == (w, h)
    assert (out / "sweep.md").read_text() == text
    assert "| skd-n3-t2 | skd | 3 | 2 | 45.0/22.5 | 57.0/28.5 |" in text
    best = text.split("Best on MLQA-dev")[1]  # per mode: highest G-XLT F1
    assert "| map-n5-t2 | skd-map | 5 | 2 |" in best and "| ce-n5 | ce |" in best
    assert "skd-n1" not in best
    ts, ntls, m = report.temperature_ntl_matrix([report.load_run(r) for r in runs], "skd-map")
    assert ts == [1.0, 2.0] and ntls == [1, 3, 5]
    assert m[1, 2] == pytest.approx(48.0)


def test_eval_sweep_reads_distill_run_dirs(tmp_path):
    """A distill.py output directory as it is: args.json with "mode", dev_metrics.jsonl (one row
    per epoch, the best-on-dev one marked), no metrics.json."""
    d = tmp_path / "distill-ntl3-t2-skd-map"
    d.mkdir()
    (d / "args.json").write_text(json.dumps({"ntl": 3, "t": 2.0, "mode": "skd-map-noce"}))
    rows = []
    for epoch, (offset, best) in enumerate([(0.0, True), (3.0, True), (1.0, False)], start=1):
        pairs = _eval_fake_pairs(offset)
        rows.append(json.dumps({"epoch": epoch, "pairs": pairs, "best": best,
                                **report.summarize_pairs(pairs)}))
    (d / "dev_metrics.jsonl").write_text("\n".join(rows) + "\n")
    run = report.load_run(str(d))
    assert run["mode"] == "skd-map-noce" and run["ntl"] == 3 and run["t"] == 2.0
    assert run["metrics"]["mlqa-dev"]["pairs"]["en-en"]["f1"] == 3.0  # epoch 2, the last best
    assert "| distill-ntl3-t2-skd-map | skd-map-noce | 3 | 2 |" in report.sweep_markdown([run])


def test_eval_sweep_missing_args_is_input_error(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"mlqa-dev": {"pairs": _eval_fake_pairs()}}))
    with pytest.raises(report.InputError, match="args.json"):
        report.load_run(str(d))
    with pytest.raises(report.InputError, match="metrics.json"):
        report.load_run(str(tmp_path))


def test_eval_sweep_fig5_temperature_choice(tmp_path):
    runs = [report.load_run(r) for r in _eval_sweep_dirs(tmp_path)]
    assert report._fig5_t(runs, "skd") == 2.0  # tie between t=1 and t=2: the best run's t
    assert report._fig5_t(runs, "ce") is None
    assert all(r["t"] is None for r in runs if r["mode"] == "ce")
    path = report.ntl_figure(runs, str(tmp_path / "f.png"), t=1.0)
    assert _eval_png_size(path)[0] == 2 * int(report.FIGSIZE[0] * report.DPI)


# ---------------------------------------------------------------- evaluate_mlqa.py --model / --sweep

EVAL_N_IDS = 4  # XQuAD ids per language in the fixtures (all 49 MLQA pairs exist for each)


def _eval_short(ex, margin=40):
    """The example with its context cut to the first answer +- margin characters, so that even
    a random model's spans often overlap the answer (non-trivial scores)."""
    a = ex["answers"][0]
    lo = max(0, a["answer_start"] - margin)
    hi = a["answer_start"] + len(a["text"]) + margin
    return dict(ex, context=ex["context"][lo:hi],
                answers=[{"text": a["text"], "answer_start": a["answer_start"] - lo}])


@pytest.fixture(scope="module")
def eval_env(tmp_path_factory):
    """MLQA-shaped dev files built from the parallel XQuAD (question from q, context and answers
    from c, same ids), XQuAD and TyDiQA-shaped subsets, and two random tiny models."""
    import common
    import train_qa
    root = tmp_path_factory.mktemp("eval")
    by_lang = {}
    for lang in EVAL_LANGS + ["el", "ru"]:
        examples = common.load_squad_examples(os.path.join(EVAL_XQUAD_DIR, f"xquad.{lang}.json"))
        by_lang[lang] = {ex["id"]: _eval_short(ex) for ex in examples}
    ids = [ex_id for ex_id in list(by_lang["en"])[:60:15]][:EVAL_N_IDS]
    mlqa = root / "MLQA_V1"
    (mlqa / "dev").mkdir(parents=True)
    for q in EVAL_LANGS:
        for c in EVAL_LANGS:
            exs = [dict(by_lang[c][i], question=by_lang[q][i]["question"]) for i in ids]
            common.atomic_write_json(str(mlqa / "dev" / f"dev-context-{c}-question-{q}.json"),
                                     common.examples_to_squad(exs))
    xquad = root / "xquad"
    for lang in ("el", "ru"):
        common.atomic_write_json(str(xquad / f"xquad.{lang}.json"),
                                 common.examples_to_squad([by_lang[lang][i] for i in ids]))
    tydi = [dict(by_lang[lang][i], id=f"{prefix}-{i}") for lang, prefix in
            (("el", "bengali"), ("ru", "finnish")) for i in ids]
    common.atomic_write_json(str(root / "tydiqa.json"), common.examples_to_squad(tydi))
    texts = [t for lang in by_lang for i in ids for t in (by_lang[lang][i]["question"],
                                                          by_lang[lang][i]["context"])]
    for name, seed in (("model", 0), ("other", 1)):
        model, tok = train_qa.load_model_and_tokenizer("tiny", texts, seed=seed)
        train_qa.save_model(model, tok, str(root / name))
    return {"root": root, "mlqa": str(mlqa), "xquad": str(xquad), "tydiqa": str(root / "tydiqa.json"),
            "model": str(root / "model"), "other": str(root / "other"), "ids": ids}


def _eval_main(argv):
    import common
    import evaluate_mlqa
    common.run_main(lambda: evaluate_mlqa.main(argv))


@pytest.fixture(scope="module")
def eval_run(eval_env):
    out = eval_env["root"] / "out"
    _eval_main(["--model", eval_env["model"], "--output-dir", str(out), "--mlqa-dir",
                eval_env["mlqa"], "--split", "dev", "--xquad-dir", eval_env["xquad"],
                "--xquad-langs", "el", "ru", "--tydiqa-file", eval_env["tydiqa"],
                "--tydiqa-langs", "bn", "fi", "--batch-size", "32"])
    return out, json.loads((out / "metrics.json").read_text())


def test_eval_model_mode_mlqa_pairs_match_drop_in_scorer(eval_env, eval_run):
    import evaluate_mlqa
    out, metrics = eval_run
    pairs = metrics["mlqa-dev"]["pairs"]
    assert sorted(pairs) == sorted(f"{q}-{c}" for q in EVAL_LANGS for c in EVAL_LANGS)
    for key, scores in pairs.items():
        q, c = key.split("-")
        dataset = os.path.join(eval_env["mlqa"], "dev", f"dev-context-{c}-question-{q}.json")
        pred = out / "predictions" / "mlqa-dev" / f"{key}.json"
        assert sorted(json.loads(pred.read_text())) == sorted(eval_env["ids"])
        assert scores["n"] == EVAL_N_IDS
        ref = evaluate_mlqa.score_files(dataset, str(pred), c)  # what the drop-in CLI prints
        assert scores["f1"] == pytest.approx(ref["f1"])
        assert scores["exact_match"] == pytest.approx(ref["exact_match"])
    assert sum(s["f1"] for s in pairs.values()) > 0  # the fixture is not trivially all-zero
    for key in ("zh-ar", "ar-zh", "en-en"):  # the drop-in command line itself
        q, c = key.split("-")
        dataset = os.path.join(eval_env["mlqa"], "dev", f"dev-context-{c}-question-{q}.json")
        res = subprocess.run([sys.executable, os.path.join(EVAL_HERE, "evaluate_mlqa.py"), dataset,
                              str(out / "predictions" / "mlqa-dev" / f"{key}.json"), c],
                             capture_output=True, text=True, cwd=EVAL_HERE)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["f1"] == pytest.approx(pairs[key]["f1"])
        assert got["exact_match"] == pytest.approx(pairs[key]["exact_match"])
    # XLT = mean of the 7 same-language pairs, G-XLT = mean of the other 42
    xlt = [pairs[f"{l}-{l}"]["f1"] for l in EVAL_LANGS]
    gxlt = [pairs[f"{q}-{c}"]["exact_match"] for q in EVAL_LANGS for c in EVAL_LANGS if q != c]
    assert metrics["mlqa-dev"]["xlt"]["f1"] == pytest.approx(sum(xlt) / 7)
    assert metrics["mlqa-dev"]["gxlt"]["exact_match"] == pytest.approx(sum(gxlt) / 42)
    zh = [pairs[f"{q}-zh"]["f1"] for q in EVAL_LANGS]
    assert metrics["mlqa-dev"]["per_context"]["zh"]["f1"] == pytest.approx(sum(zh) / 7)
    w, h = int(report.FIGSIZE[0] * report.DPI), int(report.FIGSIZE[1] * report.DPI)
    assert _eval_png_size(str(out / "fig1_mlqa_f1.png")) == (w, h)
    assert _eval_png_size(str(out / "fig8_mlqa_em.png")) == (w, h)
    assert not [f for f in os.listdir(eval_env["root"]) if f.startswith(".tmp-")]


def test_eval_model_mode_zero_shot_and_summary(eval_env, eval_run):
    import evaluate_mlqa
    out, metrics = eval_run
    assert sorted(metrics["xquad"]["pairs"]) == ["el-el", "ru-ru"]
    assert sorted(metrics["tydiqa"]["pairs"]) == ["bn-bn", "fi-fi"]
    ref = evaluate_mlqa.score_files(os.path.join(eval_env["xquad"], "xquad.ru.json"),
                                    str(out / "predictions" / "xquad" / "ru-ru.json"), "squad")
    assert metrics["xquad"]["pairs"]["ru-ru"]["f1"] == pytest.approx(ref["f1"])
    tydi = json.loads((out / "predictions" / "tydiqa" / "fi-fi.json").read_text())
    assert sorted(tydi) == sorted(f"finnish-{i}" for i in eval_env["ids"])
    x = metrics["xquad"]["pairs"]
    assert metrics["xquad"]["xlt"]["f1"] == pytest.approx((x["el-el"]["f1"] + x["ru-ru"]["f1"]) / 2)
    summary = (out / "summary.md").read_text()
    assert "(Tables 2 and 5)" in summary and "TyDiQA-GoldP zero-shot" in summary
    assert "(Table 1)" in summary and "| bn | fi |" in summary


def test_eval_model_mode_hidden_knowledge(eval_env, eval_run):
    out, metrics = eval_run
    hk = metrics["hidden-knowledge"]
    assert hk["k"] == 10 and hk["criterion"] == "em" and hk["languages"] == EVAL_LANGS
    records = []
    for q in EVAL_LANGS:
        # every example of question language q (7 context languages) is counted exactly once
        assert sum(hk["counts"][q]) + hk["not_in_top_k"][q] == hk["n"][q] == 7 * EVAL_N_IDS
        for c in EVAL_LANGS:
            nbest = json.loads((out / "nbest" / "mlqa-dev" / f"{q}-{c}.json").read_text())
            preds = json.loads((out / "predictions" / "mlqa-dev" / f"{q}-{c}.json").read_text())
            import common
            golds = {ex["id"]: [a["text"] for a in ex["answers"]] for ex in common.load_squad_examples(
                os.path.join(eval_env["mlqa"], "dev", f"dev-context-{c}-question-{q}.json"))}
            for ex_id, texts in nbest.items():
                assert 1 <= len(texts) <= 10 and len(set(texts)) == len(texts)
                assert texts[0] == preds[ex_id]  # rank 1 is the prediction
                records.append({"question_lang": q, "context_lang": c, "nbest": texts,
                                "answers": golds[ex_id]})
    again = report.hidden_knowledge_counts(records)
    assert again["counts"] == hk["counts"]
    em_top1 = sum(metrics["mlqa-dev"]["pairs"][f"{q}-{c}"]["exact_match"] * EVAL_N_IDS / 100
                  for q in EVAL_LANGS for c in EVAL_LANGS)
    assert sum(hk["counts"][q][0] for q in EVAL_LANGS) == round(em_top1)  # rank 1 = EM hits


def test_eval_model_mode_baseline_model_difference(eval_env, eval_run, capsys):
    out1, metrics = eval_run
    out = eval_env["root"] / "vs-other"
    _eval_main(["--model", eval_env["model"], "--output-dir", str(out), "--mlqa-dir",
                eval_env["mlqa"], "--split", "dev", "--skip", "xquad", "tydiqa",
                "--baseline", eval_env["other"]])
    printed = capsys.readouterr().out
    assert printed == (out / "summary.md").read_text()
    base = json.loads((out / "baseline" / "metrics.json").read_text())
    assert len(os.listdir(out / "baseline" / "predictions" / "mlqa-dev")) == 49
    w, h = int(report.FIGSIZE[0] * report.DPI), int(report.FIGSIZE[1] * report.DPI)
    for name in ("fig3_mlqa_f1_diff.png", "fig9_mlqa_em_diff.png"):
        assert _eval_png_size(str(out / name)) == (w, h)
    assert "| model |" in printed and "| other |" in printed
    assert json.loads((out / "metrics.json").read_text())["mlqa-dev"] == metrics["mlqa-dev"]
    # a baseline given as metrics.json (no second model run)
    out3 = eval_env["root"] / "vs-json"
    _eval_main(["--model", eval_env["other"], "--output-dir", str(out3), "--mlqa-dir",
                eval_env["mlqa"], "--split", "dev", "--skip", "xquad", "tydiqa",
                "--baseline", str(out1 / "metrics.json")])
    assert not (out3 / "baseline").exists() and (out3 / "fig3_mlqa_f1_diff.png").exists()
    assert json.loads((out3 / "metrics.json").read_text())["mlqa-dev"] == base["mlqa-dev"]
    # --compare: one summary with a row per model
    capsys.readouterr()
    _eval_main(["--compare", str(out1), str(out3 / "metrics.json"), "--output-dir",
                str(eval_env["root"] / "cmp")])
    text = (eval_env["root"] / "cmp" / "summary.md").read_text()
    assert text == capsys.readouterr().out
    table3 = text.split("(Table 3)")[1].split("##")[0]
    assert "| model |" in table3 and "| other |" in table3


def test_eval_model_mode_missing_data_and_dataset(eval_env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # an explicitly requested MLQA directory that is missing: exit 2, the download command named
    with pytest.raises(SystemExit) as e:
        _eval_main(["--model", eval_env["model"], "--output-dir", str(out), "--mlqa-dir",
                    str(tmp_path / "nope")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "python data/download.py mlqa" in err and "Traceback" not in err
    assert not out.exists()
    # --dataset needs --lang or --squad
    with pytest.raises(SystemExit) as e:
        _eval_main(["--model", eval_env["model"], "--output-dir", str(out), "--dataset",
                    eval_env["tydiqa"]])
    assert e.value.code == 2 and "--lang" in capsys.readouterr().err
    # default MLQA / TyDiQA locations absent (cwd without data/): skipped with a note
    monkeypatch.chdir(tmp_path)
    dataset = os.path.join(eval_env["xquad"], "xquad.el.json")
    _eval_main(["--model", eval_env["model"], "--output-dir", str(out), "--skip", "xquad",
                "--dataset", dataset, "--squad"])
    cap = capsys.readouterr()
    assert "MLQA skipped" in cap.err and "TyDiQA-GoldP skipped" in cap.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"xquad.el", "notes"} and "mlqa-dev" not in metrics
    assert metrics["xquad.el"]["n"] == EVAL_N_IDS
    assert (out / "predictions" / "xquad.el.json").exists()
    assert "MLQA skipped" in (out / "summary.md").read_text()
    # an existing output directory is refused without --overwrite
    with pytest.raises(SystemExit) as e:
        _eval_main(["--model", eval_env["model"], "--output-dir", str(out), "--skip", "xquad",
                    "--dataset", dataset, "--squad"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_eval_sweep_cli(tmp_path, capsys):
    runs = _eval_sweep_dirs(tmp_path)
    out = tmp_path / "sweep-out"
    _eval_main(["--sweep", *runs, "--output-dir", str(out), "--fig5-t", "1"])
    printed = capsys.readouterr().out
    assert printed == (out / "sweep.md").read_text()
    assert {"fig5_ntl_f1.png", "fig6_t_ntl_f1_skd.png", "fig6_t_ntl_f1_skd-map.png"} <= \
        set(os.listdir(out))
    with pytest.raises(SystemExit) as e:
        _eval_main(["--sweep", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o2")])
    assert e.value.code == 2 and "metrics.json" in capsys.readouterr().err


def test_eval_predict_nbest_short_and_long_contexts_together(eval_env):
    """MLQA has short contexts: n-best prediction must work when a batch mixes a context with
    fewer candidate spans than requested and a longer one."""
    import train_qa
    model, tok = train_qa.load_model_and_tokenizer(eval_env["model"])
    exs = [{"id": "a", "question": "Who is it?", "context": "Bob."},
           {"id": "b", "question": "Who is it?",
            "context": "It is Bob, the builder of many houses in the town."}]
    out = train_qa.predict(model, tok, exs, n_best_size=10)
    assert out["a"] and all(t in exs[0]["context"] for t in out["a"])
    assert all(t in exs[1]["context"] for t in out["b"])
