"""Evaluation (paper Sec. 4.1, 5.3): official-equivalent scoring and every evaluation of a model.

Official-equivalent MLQA v1 and SQuAD v1.1 scoring; the whole evaluation of a model: MLQA dev/test
(49 pairs, XLT, G-XLT, Table 3, Fig. 1/3/8/9), XQuAD and TyDiQA-GoldP zero-shot (Table 4), the
hidden-knowledge counts (Table 1); comparisons of evaluated models with their uncertainty (paired
bootstrap over MLQA instances, seed variance); sweeps (Fig. 5, 6); one question at a time.

Scoring forms (drop-in replacements for the official scripts; one JSON line on stdout):

    python evaluate_mlqa.py DATASET_FILE PREDICTION_FILE ANSWER_LANGUAGE   # MLQA v1 rules
    python evaluate_mlqa.py --squad DATASET_FILE PREDICTION_FILE           # SQuAD v1.1 rules

Model forms (outputs as DESIGN.md and the README describe):

    python evaluate_mlqa.py --model DIR --output-dir OUT [--baseline DIR|EVAL_DIR|metrics.json]
    python evaluate_mlqa.py --compare EVAL_DIR [EVAL_DIR ...] [--baseline EVAL_DIR] --output-dir OUT
    python evaluate_mlqa.py --sweep RUN_DIR [RUN_DIR ...] --output-dir OUT
    python evaluate_mlqa.py --model DIR --question "..." --context "..."   # or --context-file F
    python evaluate_mlqa.py --model DIR --output-dir OUT --as-authors   # their windows and answers

PREDICTION_FILE is the official format, {question id: answer text}. ANSWER_LANGUAGE is the
context language (en es de ar vi hi zh). A question without a prediction scores 0 and is reported
on stderr, as the official scripts do.

The scoring functions at the top reimplement the rules of the official `mlqa_evaluation_v1.py`
(facebookresearch/MLQA) and `evaluate-v1.1.py` (SQuAD); tests compare them with a literal
transcription of those rules. The rules, to the letter:
  normalise = lower-case -> delete punctuation -> delete articles -> tokenise -> join with ' '
  - punctuation: every character whose Unicode category starts with 'P', plus string.punctuation
    (SQuAD: string.punctuation only);
  - articles, replaced by ' ' with word boundaries: en a|an|the, es un|una|unos|unas|el|la|los|las,
    de ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des, vi của|là|cái|chiếc|những,
    hi and zh none. ar: the official pattern is '\\sال^|ال'; its first branch can never match (it
    wants the start of the string after a character), so every 'ال' is replaced by ' ', even
    inside words;
  - tokens: whitespace split, except zh: each CJK character U+4E00..U+9FA5 and each punctuation
    character is a token of its own and the text between them is split on whitespace;
  - EM = normalised strings equal; F1 = token-bag F1 of the normalised texts split on whitespace
    (0 when no token is shared); both the max over the gold answers, summed over the questions,
    divided by the number of questions (unanswered ones included) and multiplied by 100.
"""
import contextlib
import functools
import json
import os
import re
import string
import sys
import time
import unicodedata
from collections import Counter

import common  # noqa: F401 (first: OpenMP's wait policy before torch loads it)
import numpy as np
from tqdm import tqdm

import report
import significance
import train_qa
from common import (LANGUAGES, MLQA_DIR, TYDIQA_FILE, TYDIQA_ID_PREFIXES, TYDIQA_ZERO_SHOT,
                    XQUAD_DIR, XQUAD_ZERO_SHOT, ArgumentParser, InputError, atomic_output_dir,
                    atomic_write_json, atomic_write_text, check_seed, check_writable,
                    load_squad_examples, parse_with_preset, read_json, run_main)
from rundir import ProgressLines, check_output_dir, lock_output_dir, write_marker

SQUAD = "squad"  # pseudo-language selecting the SQuAD v1.1 rules

# ----------------------------------------------------------------------------------------------
# Scoring (official MLQA v1 and SQuAD v1.1 rules)

_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
    "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
}
_ARTICLES = {lang: re.compile(pattern) for lang, pattern in _ARTICLES.items()}
_ARTICLES[SQUAD] = _ARTICLES["en"]
_ARABIC_ARTICLE = "ال"
_SQUAD_PUNCT = frozenset(string.punctuation)


@functools.lru_cache(maxsize=None)
def _mlqa_punct():
    """Characters the official MLQA script deletes: Unicode category P* and string.punctuation.

    (The official set scans code points below sys.maxunicode; the last one, U+10FFFF, is not
    punctuation, so scanning all of them is the same set.)"""
    return frozenset(c for c in map(chr, range(sys.maxunicode + 1))
                     if unicodedata.category(c)[0] == "P") | _SQUAD_PUNCT


def _check_lang(lang):
    if lang != SQUAD and lang not in LANGUAGES:
        raise InputError(f"unknown answer language '{lang}' (expected one of "
                         f"{' '.join(LANGUAGES)}, or --squad)")


def _is_cjk(ch):
    return "\u4e00" <= ch <= "\u9fa5"


def mixed_segmentation(text, punct=None):
    """zh tokens: every CJK character and every punctuation character alone, the rest split on
    whitespace."""
    punct = _mlqa_punct() if punct is None else punct
    tokens, run = [], []
    for ch in text:
        if _is_cjk(ch) or ch in punct:
            tokens.extend("".join(run).split())
            run = []
            tokens.append(ch)
        else:
            run.append(ch)
    tokens.extend("".join(run).split())
    return tokens


def normalize_answer(s, lang):
    """Lower-case, drop punctuation and articles, re-join tokens with single spaces."""
    _check_lang(lang)
    punct = _SQUAD_PUNCT if lang == SQUAD else _mlqa_punct()
    text = "".join(ch for ch in s.lower() if ch not in punct)
    if lang in _ARTICLES:
        text = _ARTICLES[lang].sub(" ", text)
    elif lang == "ar":
        text = text.replace(_ARABIC_ARTICLE, " ")  # = re.sub('\sال^|ال', ' ', text), see top
    tokens = mixed_segmentation(text, punct) if lang == "zh" else text.split()
    return " ".join(t for t in tokens if t.strip())


def f1_score(prediction, ground_truth, lang):
    pred = normalize_answer(prediction, lang).split()
    gold = normalize_answer(ground_truth, lang).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction, ground_truth, lang):
    return float(normalize_answer(prediction, lang) == normalize_answer(ground_truth, lang))


def _questions(examples_or_dataset, name):
    """Yield (id, [gold answer texts]) from flat examples, a SQuAD dict or its 'data' list."""
    data = examples_or_dataset
    if isinstance(data, dict):
        if "data" not in data:
            raise InputError(f"{name}: missing field 'data'")
        data = data["data"]
    for item in data:
        if "paragraphs" in item:  # a SQuAD article
            for paragraph in item["paragraphs"]:
                for qa in paragraph["qas"]:
                    yield qa, qa["id"]
        else:  # a flat example (common.load_squad_examples)
            yield item, item["id"]


UNANSWERED_SHOWN = 5  # unanswered questions named on stderr one by one; the rest are counted


def report_unanswered_questions(ids, total, name="dataset"):
    """The official scripts' "Unanswered question ID will receive score 0." lines on stderr, for
    the first UNANSWERED_SHOWN ids only, then one line with the count (a predictions file that
    covers 100 of 1,190 ids would print 1,090 lines)."""
    for qid in ids[:UNANSWERED_SHOWN]:
        print(f"Unanswered question {qid} will receive score 0.", file=sys.stderr)
    if len(ids) > UNANSWERED_SHOWN:
        print(f"... and {len(ids) - UNANSWERED_SHOWN} more: {len(ids)} of {total} questions of "
              f"{name} unanswered, each scored 0", file=sys.stderr)


def question_scores(examples_or_dataset, predictions, lang, report_unanswered=True,
                    name="dataset"):
    """(id, EM, F1) of every question in file order, each in 0..1 (the max over its gold
    answers); an unanswered question scores (0, 0) and, with report_unanswered, is reported on
    stderr like the official scripts (the first few by id, then a count)."""
    _check_lang(lang)
    unanswered, total = [], 0
    for qa, qid in _questions(examples_or_dataset, name):
        total += 1
        if qid not in predictions:
            unanswered.append(qid)
            yield qid, 0.0, 0.0
            continue
        prediction = predictions[qid]
        if not isinstance(prediction, str):
            raise InputError(f"predictions: answer for question '{qid}' is not a string")
        if "answers" not in qa:
            raise InputError(f"{name}: missing field 'answers' in question '{qid}'")
        golds = [a["text"] for a in qa["answers"]]
        if not golds:
            raise InputError(f"{name}: question '{qid}' has no gold answers")
        yield (qid, max(exact_match_score(prediction, g, lang) for g in golds),
               max(f1_score(prediction, g, lang) for g in golds))
    if report_unanswered:
        report_unanswered_questions(unanswered, total, name)


def evaluate_predictions(examples_or_dataset, predictions, lang, report_unanswered=True,
                         name="dataset"):
    """Official-equivalent scores of `predictions` ({id: text}) -> {"exact_match", "f1", "n"}.

    `lang` is the answer (context) language, or "squad" for the SQuAD v1.1 rules. Unanswered
    questions score 0. `name` (e.g. the dataset's path) starts the message of an InputError.
    Summed in file order and divided once, as the official scripts do (the same last decimal).
    """
    em = f1 = 0.0
    total = 0
    for _, q_em, q_f1 in question_scores(examples_or_dataset, predictions, lang,
                                         report_unanswered, name):
        em, f1, total = em + q_em, f1 + q_f1, total + 1
    if total == 0:
        raise InputError(f"{name}: no questions to score")
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total, "n": total}


def read_predictions(path):
    """An official predictions file: a JSON object {question id: answer text}."""
    predictions = read_json(path)
    if not isinstance(predictions, dict):
        raise InputError(f"{path}: expected a JSON object {{question id: answer text}}")
    for qid, text in predictions.items():
        if not isinstance(text, str):
            raise InputError(f"{path}: answer for question '{qid}' is not a string")
    return predictions


def load_gold_examples(path):
    """A SQuAD-format evaluation file's examples, every question with a gold answer: checked as it
    is read, before hours of prediction, not when its score is due."""
    examples = load_squad_examples(path)
    for ex in examples:
        if not ex["answers"]:
            raise InputError(f"{path}: question '{ex['id']}' has no gold answers")
    return examples


def score_files(dataset_file, prediction_file, lang):
    """The drop-in form: score one predictions file against one SQuAD-format dataset file."""
    _check_lang(lang)
    examples = load_gold_examples(dataset_file)
    predictions = read_predictions(prediction_file)
    return evaluate_predictions(examples, predictions, lang, name=dataset_file)


# ----------------------------------------------------------------------------------------------
# Hidden knowledge in the top-k answers (Sec. 4.1, Table 1)

HIDDEN_K = 10                                  # Table 1: top-10 answers on MLQA-dev
HIDDEN_CRITERIA = ("em", "f1", "raw")


def first_correct_rank(candidates, gold_answers, answer_lang, criterion="em", f1_threshold=50.0):
    """1-based rank of the first candidate that is correct, or None.

    Correct = exact match with some gold answer (criterion "em"); with "f1", a token F1 >=
    f1_threshold (in percent, like the reported scores) with some gold answer; both under the
    official MLQA rules of the answer (context) language ("squad": SQuAD v1.1 rules). "raw" is
    the authors' count: the candidate string equal, unnormalised, to the FIRST gold answer.
    """
    if criterion not in HIDDEN_CRITERIA:
        raise InputError(f"hidden knowledge: unknown criterion '{criterion}' "
                         f"({' or '.join(HIDDEN_CRITERIA)})")
    for rank, text in enumerate(candidates, start=1):
        if criterion == "raw":
            ok = bool(gold_answers) and text == gold_answers[0]
        elif criterion == "em":
            ok = any(exact_match_score(text, g, answer_lang) for g in gold_answers)
        else:
            ok = any(100.0 * f1_score(text, g, answer_lang) >= f1_threshold for g in gold_answers)
        if ok:
            return rank
    return None


def hidden_knowledge_counts(records, k=HIDDEN_K, criterion="em", f1_threshold=50.0,
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
# Model mode: every evaluation of the paper for one model (Sec. 5.3; Tables 1-5, Fig. 1, 3, 8, 9)
#
#   python evaluate_mlqa.py --model DIR --output-dir OUT [--split dev test] [--baseline B]
#
# All examples of all requested data sets are pooled, deduplicated by (question, context),
# sorted by length and run through train_qa.predict in large chunks (features built once per
# chunk, length-sorted batches, bf16 autocast on CUDA, vectorised span extraction), under one
# progress bar. Predictions are then scored per (question, context) language pair with the rules
# above, and report.py draws the figures and writes summary.md.

EVAL_BATCH_SIZE = None                 # None: train_qa.eval_batch_size (128 on CUDA, 16 on CPU)
MEMORY_HINT = "smaller passes may fit: --batch-size 32 (windows per pass; 128 by default on a GPU)"
# --as-authors: their evaluation (eval_qa.sh -> run_squad_w_distillation.py --do_eval): the legacy
# processor's windows, questions cut at 64, their post-processing, true fp32; and Table 1 counted
# as their analysis counts it (a top-10 answer equal to the first gold answer, raw string)
AS_AUTHORS = dict(windows="legacy", answers="legacy", max_query_length=train_qa.MAX_QUERY_LENGTH,
                  precision="fp32", hidden_knowledge="raw")
PREDICT_CHUNK = 2048                           # examples per train_qa.predict call
ANSWER_BYTES = 40                              # an answer in a predictions file, about (JSON)


def _note(notes, text):
    notes.append(text)
    print(f"note: {text}", file=sys.stderr)


def _present(path, exists, explicit, what, fetch, notes):
    """Whether a data set is there; absent, an error when the user named it, else a note."""
    if exists(path):
        return True
    how = f"; run `{fetch}` first" if fetch else ""
    if explicit:
        raise InputError(f"{path}: {what} not found{how}")
    _note(notes, f"{what} skipped: {path} not found" + (f" ({fetch})" if fetch else ""))
    return False


def mlqa_pair_path(mlqa_dir, split, q, c):
    """The official MLQA v1 file of one (question language q, context language c) pair."""
    return os.path.join(mlqa_dir, split, f"{split}-context-{c}-question-{q}.json")


def mlqa_task(split, q, c, path, examples, nbest=False):
    """A task (see predict_tasks) scoring one MLQA pair with the rules of its context language."""
    return {"group": f"mlqa-{split}", "key": f"{q}-{c}", "lang": c, "path": path,
            "examples": examples, "nbest": nbest, "question_lang": q, "context_lang": c}


def _mlqa_tasks(mlqa_dir, explicit, splits, notes):
    """One task per (split, question language, context language): the 49 pair files of a split."""
    if not _present(mlqa_dir, os.path.isdir, explicit, "MLQA", "python data/download.py mlqa",
                    notes):
        return []
    tasks = []
    for split in splits:
        for q in LANGUAGES:
            for c in LANGUAGES:
                path = mlqa_pair_path(mlqa_dir, split, q, c)
                if not os.path.isfile(path):
                    raise InputError(f"{path}: file not found; run `python data/download.py mlqa`")
                tasks.append(mlqa_task(split, q, c, path, load_gold_examples(path),
                                       nbest=split == "dev"))
    return tasks


def _xquad_tasks(xquad_dir, explicit, languages, notes):
    """XQuAD zero-shot (Table 4): same-language pairs, SQuAD v1.1 rules."""
    if not _present(xquad_dir, os.path.isdir, explicit, "XQuAD", None, notes):
        return []
    paths = {l: os.path.join(xquad_dir, f"xquad.{l}.json") for l in languages}
    return [{"group": "xquad", "key": f"{l}-{l}", "lang": SQUAD, "nbest": False, "path": paths[l],
             "examples": load_gold_examples(paths[l])} for l in languages]


def _tydiqa_tasks(path, explicit, languages, notes):
    """TyDiQA-GoldP dev (Table 4), split by the language its ids start with, SQuAD v1.1 rules."""
    if not _present(path, os.path.isfile, explicit, "TyDiQA-GoldP",
                    "python data/download.py tydiqa", notes):
        return []
    by_lang = {}
    for ex in load_gold_examples(path):
        lang = TYDIQA_ID_PREFIXES.get(ex["id"].split("-", 1)[0])
        if lang is None:
            raise InputError(f"{path}: question id '{ex['id']}' names no known language")
        by_lang.setdefault(lang, []).append(ex)
    languages = sorted(by_lang) if languages == ["all"] else languages
    missing = [l for l in languages if l not in by_lang]
    if missing:
        raise InputError(f"{path}: no questions in language(s) {' '.join(missing)} "
                         f"(present: {' '.join(sorted(by_lang))})")
    return [{"group": "tydiqa", "key": f"{l}-{l}", "lang": SQUAD, "nbest": False, "path": path,
             "examples": by_lang[l]} for l in languages]


def predict_tasks(model, tokenizer, tasks, batch_size=EVAL_BATCH_SIZE, device=None, desc="eval",
                  feature_cache=None, precision="auto", max_query_length=train_qa.MAX_QUERY_LENGTH,
                  windows="fast", answers="offsets", progress_lines=True):
    """Answers for every task's examples: sets task["predictions"] {id: text} and, for tasks
    with "nbest", task["nbest"] {id: [up to HIDDEN_K distinct texts, best first]}.
    windows / answers: train_qa.build_features's / train_qa.predict's (legacy: the authors').
    feature_cache: a dict kept by the caller to tokenise the same tasks only once (distill.py
    evaluates MLQA dev after every epoch). progress_lines: when stderr is no terminal (a batch
    job), a line on stderr every few minutes in place of the bar (off on DDP ranks other than 0)."""
    index, items, want_nbest = {}, [], []
    for task in tasks:                     # dedupe by (question, context) over all tasks
        task["_rows"] = []
        for ex in task["examples"]:
            key = (ex["question"], ex["context"])
            if key not in index:
                index[key] = len(items)
                items.append({"id": str(len(items)), "question": ex["question"],   # a row
                              "context": ex["context"],          # number; errors name the
                              "name": f"{task['path']}: question '{ex['id']}'"})  # question
                want_nbest.append(False)
            want_nbest[index[key]] |= bool(task["nbest"])
            task["_rows"].append(index[key])
    found = [None] * len(items)
    lines, t0, done = ProgressLines(progress_lines, sys.stderr), time.time(), 0
    with tqdm(total=len(items), desc=desc, unit="ex", disable=None) as bar:
        for n_best in (HIDDEN_K, 1):
            rows = [i for i in range(len(items)) if want_nbest[i] == (n_best > 1)]
            # a context's questions (one per language) side by side: build_features tokenises
            # each distinct context of a chunk once
            rows.sort(key=lambda i: (-len(items[i]["context"]), items[i]["context"],
                                     items[i]["question"]))
            for lo in range(0, len(rows), PREDICT_CHUNK):
                chunk = [items[i] for i in rows[lo:lo + PREDICT_CHUNK]]
                features = None if feature_cache is None else feature_cache.get((n_best, lo))
                if features is None:
                    features = train_qa.build_features(chunk, tokenizer, train=False,
                                                       max_query_length=max_query_length,
                                                       windows=windows)
                    if feature_cache is not None:
                        feature_cache[(n_best, lo)] = features
                out = train_qa.predict(model, tokenizer, chunk, batch_size=batch_size,
                                       device=device, n_best_size=n_best, features=features,
                                       precision=precision, answers=answers)
                for ex in chunk:
                    got = out[ex["id"]]
                    found[int(ex["id"])] = got if n_best > 1 else ([got] if got else [])
                bar.update(len(chunk))
                done += len(chunk)
                rate = done / (time.time() - t0)
                lines.maybe(lambda: f"{desc}: {done}/{len(items)} examples, {rate:.0f}/s, "
                                    f"ETA {(len(items) - done) / rate / 60:.1f} min")
    for task in tasks:
        rows = task.pop("_rows")
        task["predictions"] = {ex["id"]: found[r][0] if found[r] else ""
                               for ex, r in zip(task["examples"], rows)}
        if task["nbest"]:
            task["nbest"] = {ex["id"]: found[r] for ex, r in zip(task["examples"], rows)}
    return tasks


def score_tasks(tasks, hidden_criterion="em", hidden_f1=50.0):
    """metrics.json's content (DESIGN.md keys) from predicted tasks."""
    metrics = {}
    for task in tasks:
        scores = evaluate_predictions(task["examples"], task["predictions"], task["lang"],
                                      name=task["path"])
        if task["key"] is None:                         # --dataset FILE
            metrics[task["group"]] = scores
        else:
            metrics.setdefault(task["group"], {"pairs": {}})["pairs"][task["key"]] = scores
    for group, value in metrics.items():
        if group.startswith("mlqa-"):
            value.update(report.summarize_pairs(value["pairs"]))
        elif "pairs" in value:
            value["xlt"] = report.same_language_summary(value["pairs"])
    dev = [t for t in tasks if t["group"] == "mlqa-dev" and t["nbest"]]
    if dev:  # Sec. 4.1, Table 1
        records = [{"question_lang": t["question_lang"], "context_lang": t["context_lang"],
                    "nbest": t["nbest"][ex["id"]], "answers": [a["text"] for a in ex["answers"]]}
                   for t in dev for ex in t["examples"]]
        metrics["hidden-knowledge"] = {"split": "mlqa-dev", **hidden_knowledge_counts(
            records, HIDDEN_K, hidden_criterion, hidden_f1)}
    return metrics


def _prediction_path(task):
    if task["key"] is None:
        return os.path.join("predictions", f"{task['group']}.json")
    return os.path.join("predictions", task["group"], f"{task['key']}.json")


def evaluate_model(model_dir, out_dir, tasks, batch_size=EVAL_BATCH_SIZE, device=None,
                   hidden_criterion="em", hidden_f1=50.0, desc="eval", precision="auto",
                   max_query_length=train_qa.MAX_QUERY_LENGTH, windows="fast", answers="offsets",
                   as_authors=False, compile=False):
    """Predict, score and write predictions (and MLQA-dev n-best lists) under out_dir (which
    must exist); returns the metrics dict (not yet written; "options": how it was computed).
    compile: torch.compile the model's forward (--compile)."""
    train_qa.set_matmul_precision(precision, device)
    model, tokenizer = train_qa.load_model_and_tokenizer(model_dir, require_qa_head=True)
    if compile:
        train_qa.compile_forward(model)
    predict_tasks(model, tokenizer, tasks, batch_size, device, desc, precision=precision,
                  max_query_length=max_query_length, windows=windows, answers=answers)
    metrics = {"model": os.path.abspath(model_dir),
               "options": dict(windows=windows, answers=answers, max_query_length=max_query_length,
                               precision=precision, as_authors=as_authors)}
    metrics.update(score_tasks(tasks, hidden_criterion, hidden_f1))
    for task in tasks:
        atomic_write_json(os.path.join(out_dir, _prediction_path(task)), task["predictions"])
        if task["nbest"]:
            atomic_write_json(os.path.join(out_dir, "nbest", task["group"], f"{task['key']}.json"),
                              task["nbest"])
    return metrics


def _predictions_bytes(tasks):
    """About the size of the predictions (and n-best lists) of `tasks`, to check before hours of
    predicting that the disk has room: an id and ANSWER_BYTES per answer."""
    return sum(len(ex["id"]) + ANSWER_BYTES * (1 + HIDDEN_K * bool(task["nbest"]))
               for task in tasks for ex in task["examples"])


def _load_baseline(path, option="--baseline"):
    """--baseline (or --compare, named by `option` in errors): a metrics.json, an evaluation
    directory holding one, or a model directory (then None: it is evaluated like the model)."""
    if os.path.isfile(path):
        return report.checked_metrics(read_json(path), path)
    if os.path.isfile(os.path.join(path, "metrics.json")):
        path = os.path.join(path, "metrics.json")
        return report.checked_metrics(read_json(path), path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    if not os.path.exists(path):
        raise InputError(f"{path}: {option}: not found")
    raise InputError(f"{path}: {option} is neither a metrics.json, an evaluation directory "
                     "holding one, nor a model directory")


def _model_name(path):
    return os.path.basename(os.path.normpath(path)) or path


def _check_model_args(args):
    if args.files:
        raise InputError("--model takes no positional files")
    if args.dataset and not (args.lang or args.squad):
        raise InputError("--dataset needs --lang L (MLQA rules) or --squad (SQuAD v1.1 rules)")
    if args.lang and args.squad:
        raise InputError("--lang (MLQA rules) and --squad (SQuAD v1.1 rules) exclude each other")
    if args.lang and not args.dataset:
        raise InputError("--lang applies to --dataset")
    if args.lang:
        _check_lang(args.lang)
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.max_query_length < 1:
        raise InputError(f"--max-query-length must be at least 1, got {args.max_query_length}")
    if not 0 <= args.hidden_knowledge_f1 <= 100:                      # also NaN
        raise InputError(f"--hidden-knowledge-f1 must be a percentage, 0..100, got "
                         f"{args.hidden_knowledge_f1}")
    check_output(args, [("--model", args.model), ("--baseline", args.baseline),
                        ("--mlqa-dir", args.mlqa_dir), ("--xquad-dir", args.xquad_dir),
                        ("--tydiqa-file", args.tydiqa_file), ("--dataset", args.dataset)])


def _collect_tasks(args, notes):
    """The tasks of every requested data set present (model mode)."""
    skip, tasks = set(args.skip or ()), []
    if "mlqa" not in skip:
        tasks += _mlqa_tasks(args.mlqa_dir or MLQA_DIR, args.mlqa_dir is not None, args.split,
                             notes)
    if "xquad" not in skip:
        tasks += _xquad_tasks(args.xquad_dir or XQUAD_DIR, args.xquad_dir is not None,
                              args.xquad_langs, notes)
    if "tydiqa" not in skip:
        tasks += _tydiqa_tasks(args.tydiqa_file or TYDIQA_FILE, args.tydiqa_file is not None,
                               args.tydiqa_langs, notes)
    if args.dataset:
        name = os.path.basename(args.dataset)
        name = name[:-5] if name.endswith(".json") else name
        tasks.append({"group": name, "key": None, "lang": SQUAD if args.squad else args.lang,
                      "nbest": False, "path": args.dataset,
                      "examples": load_gold_examples(args.dataset)})
    if not tasks:
        raise InputError("nothing to evaluate: no data set found or requested")
    return tasks


def _data_sources(args, tasks):
    """Where the evaluated data sets came from (metrics.json "data"), so that --compare finds
    their gold answers again."""
    groups = {t["group"] for t in tasks}
    sources = {"mlqa": args.mlqa_dir or MLQA_DIR, "xquad": args.xquad_dir or XQUAD_DIR,
               "tydiqa": args.tydiqa_file or TYDIQA_FILE}
    return {name: os.path.abspath(path) for name, path in sources.items()
            if any(g == name or g.startswith(name + "-") for g in groups)}


def check_output(args, inputs):
    """Before any work: --output-dir is not an input (nor holds one), and is an earlier
    evaluation (or new, or empty) when it exists (rundir; main checked it can be written)."""
    check_output_dir(args.output_dir, "evaluate", args.overwrite, inputs=inputs)


@contextlib.contextmanager
def output_dir(args):
    """The evaluation is written under a temporary name beside --output-dir and swapped in whole
    at the end (common.atomic_output_dir); the earlier evaluation it replaces is named."""
    replacing = os.path.isdir(args.output_dir) and bool(os.listdir(args.output_dir))
    with atomic_output_dir(args.output_dir, overwrite=True) as tmp:
        write_marker(tmp, "evaluate")
        yield tmp
    if replacing:
        print(f"replaced the earlier evaluation in {args.output_dir}", file=sys.stderr)


def model_mode(args):
    """--model DIR --output-dir OUT: predict, score, write predictions, metrics.json, Fig. 1/8,
    summary.md; with --baseline, Fig. 3/9 and the significance of the difference."""
    _check_model_args(args)
    notes = []
    baseline = _load_baseline(args.baseline) if args.baseline else None
    if args.baseline and baseline is None:     # a model directory: one that does not load is
        train_qa.load_model_and_tokenizer(args.baseline, require_qa_head=True)   # found now
    tasks = _collect_tasks(args, notes)
    if baseline is not None:        # an evaluation: its answers are its table's (before the model
        base_predictions = _saved_predictions_or_note(args.baseline, baseline, notes)   # runs)
        if base_predictions is not None:
            _check_saved_answers({"dir": _eval_dir(args.baseline), "metrics": baseline,
                                  "predictions": base_predictions}, tasks)
    name = _model_name(args.model)
    models = 1 + (args.baseline is not None and baseline is None)     # a baseline model: twice
    check_writable(args.output_dir, models * _predictions_bytes(tasks), "the predictions")
    with output_dir(args) as tmp:
        kw = dict(batch_size=args.batch_size, device=args.device, precision=args.precision,
                  max_query_length=args.max_query_length, windows=args.windows, answers=args.answers,
                  as_authors=args.as_authors, compile=args.compile,
                  hidden_criterion=args.hidden_knowledge, hidden_f1=args.hidden_knowledge_f1)
        fresh = [{k: v for k, v in t.items() if k != "predictions"} for t in tasks]
        metrics = evaluate_model(args.model, tmp, tasks, desc=name, **kw)
        metrics["data"] = _data_sources(args, tasks)
        runs, comparisons = [(name, metrics)], []
        report.pair_heatmaps(metrics, tmp, name=name)
        if args.baseline:
            base_name = _model_name(args.baseline if baseline is None or
                                    not isinstance(baseline.get("model"), str)
                                    else baseline["model"])
            base_name += " (baseline)" if base_name == name else ""
            if baseline is None:   # a model directory: evaluate it on the same data
                base_dir = os.path.join(tmp, "baseline")
                baseline = evaluate_model(args.baseline, base_dir, fresh, desc=base_name, **kw)
                baseline["data"] = metrics["data"]
                atomic_write_json(os.path.join(base_dir, "metrics.json"), baseline, indent=1)
                base_predictions = _task_predictions(fresh)
            runs.append((base_name, baseline))
            comparisons = _baseline_significance(args, tasks, base_predictions, base_name, name)
            _write_significance(tmp, comparisons, args)
            marks = report.significant_pairs(comparisons[0]) if comparisons else None
            if not report.difference_heatmaps(metrics, baseline, tmp, name=name,
                                              baseline_name=base_name, marks=marks):
                _note(notes, "no MLQA split in both the model's and the baseline's metrics: "
                             "no difference heat map")
        if notes:
            metrics["notes"] = notes
        atomic_write_json(os.path.join(tmp, "metrics.json"), metrics, indent=1)
        text = report.summary_markdown(runs, title=f"Evaluation of {args.model}")
        text += report.significance_markdown(comparisons)
        if notes:
            text += "\n" + "\n".join(f"- note: {n}" for n in notes) + "\n"
        atomic_write_text(os.path.join(tmp, "summary.md"), text)
    print(text, end="")
    return metrics


def compare_mode(args):
    """--compare EVAL ... [--baseline EVAL]: one summary.md with a row per model in every table
    (Tables 1-5), seed variance of runs that differ only in --seed, and significance.json: each
    model against the baseline (else against the first), paired bootstrap over instances."""
    check_output(args, [("--compare", path) for path in args.compare] +
                 [("--baseline", args.baseline)])
    runs = [_compared(path, "--compare") for path in args.compare]
    baseline = _compared(args.baseline, "--baseline") if args.baseline else None
    runs, dropped = _distinct_evaluations(runs, baseline)
    _unique_names(([baseline] if baseline else []) + runs)
    pairs = [(baseline, r) for r in runs] if baseline else [(runs[0], r) for r in runs[1:]]
    comparisons = [] if args.bootstrap == 0 else \
        [compare_two(a, b, _gold_for(a, b, args), args.bootstrap, args.bootstrap_seed)
         for a, b in pairs]
    shown = ([baseline] if baseline else []) + runs
    text = report.summary_markdown([(r["name"], r["metrics"]) for r in shown], title="Comparison")
    for a, b in pairs if comparisons else []:      # data sets only one side evaluated: said
        ga, gb = _tested_groups(a["metrics"]), _tested_groups(b["metrics"])
        alone = sorted(set(ga) ^ set(gb))
        if alone:
            text += (f"\n- note: {b['name']} - {a['name']}: not compared on "
                     f"{', '.join(alone)} (evaluated for one of them only)\n")
    text += "".join(f"\n- note: {path} is the --baseline; compared once, as the baseline\n"
                    for path in dropped)
    text += report.seed_variance_markdown([(r["name"], r["metrics"], report.run_config(
        r["metrics"])) for r in shown])
    text += report.significance_markdown(comparisons)
    with output_dir(args) as tmp:
        atomic_write_text(os.path.join(tmp, "summary.md"), text)
        _write_significance(tmp, comparisons, args)
        for (a, b), comparison in zip(pairs, comparisons):
            report.difference_heatmaps(b["metrics"], a["metrics"], tmp, name=b["name"],
                                       baseline_name=a["name"], marks=report.significant_pairs(
                                           comparison), suffix="_" + _safe(b["name"]))
    print(text, end="")


def sweep_mode(args):
    """--sweep RUN_DIR ...: Fig. 5, 6, 10, 11 and a table over distill.py runs (report.py)."""
    check_output(args, [("--sweep", path) for path in args.sweep])
    with output_dir(args) as tmp:
        text, _ = report.sweep_report(args.sweep, tmp, fig5_t=args.fig5_t)
    print(text, end="")


# ----------------------------------------------------------------------------------------------
# Is a difference real? (issue 11) The paired bootstrap of significance.py over MLQA instances
#
# Per-example F1/EM are recomputed from each evaluation's saved predictions with the rules above,
# on the data files the evaluation used (the same --mlqa-dir / --xquad-dir / --tydiqa-file
# options). An MLQA instance keeps its id in all 49 pair files, so resampling ids keeps the
# correlation between pairs; XQuAD ids are shared across its languages alike.

def example_scores(examples, predictions, lang):
    """{id: (F1, EM)} of every question, each in 0..100 (unanswered: 0)."""
    return {qid: (100.0 * f1, 100.0 * em) for qid, em, f1 in
            question_scores(examples, predictions, lang, report_unanswered=False)}


def _tested_groups(metrics):
    """{group: [keys]} of the data sets with language pairs (MLQA splits, XQuAD, TyDiQA)."""
    return {group: sorted(value["pairs"]) for group, value in metrics.items()
            if isinstance(value, dict) and "pairs" in value}


def _aggregates(group, keys):
    """The means a comparison reports: MLQA G-XLT (all pairs), XLT (q == c) and G-XLT q != c;
    XQuAD and TyDiQA XLT (all their same-language pairs)."""
    same = [k for k in keys if k.split("-")[0] == k.split("-")[1]]
    if not group.startswith("mlqa-"):
        return {"xlt": same}
    return {"gxlt": list(keys), "xlt": same, "gxlt_cross": [k for k in keys if k not in same]}


def compare_two(a, b, gold, n_resamples, seed):
    """B - A on every data set in `gold` ({group: {key: (examples, lang)}}): {"a", "b",
    group: {metric: {"pairs": {key: result}, aggregate: result}}} where a result is
    significance.bootstrap_differences' (diff, ci, p, n, units, mean_a, mean_b) and, for the
    aggregates, the Wilcoxon p of the per-example differences of their pairs (the authors' test,
    with the XLT selection made before the test)."""
    out = {"a": a["name"], "b": b["name"]}
    for group, pairs in gold.items():
        for run in (a, b):                     # an evaluation answers every question it scored
            for key, (examples, _) in pairs.items():
                missing = sum(ex["id"] not in run["predictions"][group][key] for ex in examples)
                if missing:
                    raise InputError(
                        f"{os.path.join(run.get('dir') or run['name'], 'predictions', group, key)}"
                        f".json: no answer for {missing} of its {len(examples)} questions (an "
                        "edited or damaged file): its evaluation would score them 0")
        scores = {side: {key: example_scores(examples, run["predictions"][group][key], lang)
                         for key, (examples, lang) in pairs.items()}
                  for side, run in (("a", a), ("b", b))}
        for side, run in (("a", a), ("b", b)):
            _check_scores_match_metrics(run, group, scores[side])
        aggregates = _aggregates(group, list(pairs))
        out[group] = {}
        metrics = ("f1", "exact_match")
        aligned = {metric: significance.align_cells(
            *({key: {qid: v[m] for qid, v in scores[side][key].items()} for key in pairs}
              for side in ("a", "b"))) for m, metric in enumerate(metrics)}
        # F1 and EM in one pass: the same resamples (draws of instances) for both
        both = significance.bootstrap_differences(
            {f"{metric}:{key}": cell for metric in metrics
             for key, cell in aligned[metric].items()},
            {f"{metric}:{name}": [f"{metric}:{k}" for k in members]
             for metric in metrics for name, members in aggregates.items() if members},
            n_resamples, seed)
        for metric in metrics:
            cells = aligned[metric]
            result = {name.split(":", 1)[1]: r for name, r in both.items()
                      if name.startswith(metric + ":")}
            for name, members in aggregates.items():
                if members:
                    result[name]["wilcoxon_p"] = significance.wilcoxon_p(
                        np.concatenate([cells[k][1] for k in members]),
                        np.concatenate([cells[k][2] for k in members]))
            out[group][metric] = {"pairs": {k: result[k] for k in pairs},
                                  **{name: result[name] for name in aggregates if aggregates[name]}}
    return out


SCORE_TOLERANCE = 1e-6       # the same scores summed in two orders differ by ~1e-12, not more


def _check_scores_match_metrics(run, group, scores):
    """The tables show an evaluation's metrics.json, the intervals come from its predictions
    files: a directory that mixes two evaluations (a predictions file copied in or edited, other
    gold data) would report a table and an interval of different models. One line instead."""
    recorded = run.get("metrics", {}).get(group, {}).get("pairs", {})
    for key, by_question in scores.items():
        for m, metric in enumerate(("f1", "exact_match")):
            saved = recorded.get(key, {}).get(metric)
            again = sum(v[m] for v in by_question.values()) / max(len(by_question), 1)
            if saved is not None and abs(saved - again) > SCORE_TOLERANCE:
                raise InputError(
                    f"{os.path.join(run['dir'], 'predictions', group, key)}.json: its answers score "
                    f"{metric} {again:.2f} on this gold data, its metrics.json says {saved:.2f} (a "
                    "file copied in or edited, or other data): evaluate the model again")


def _check_saved_answers(run, tasks):
    """_check_scores_match_metrics for the tasks (gold data) whose answers `run` has saved."""
    for t in tasks:
        saved = run["predictions"].get(t["group"], {}).get(t["key"])
        if saved is not None:
            _check_scores_match_metrics(run, t["group"], {t["key"]: example_scores(
                t["examples"], saved, t["lang"])})


def _compared(path, option):
    """A --compare / --baseline input (`option`, named in errors): {"name", "metrics", "dir",
    "path"} (dir: the evaluation directory holding predictions/)."""
    metrics = _load_baseline(path, option)
    if metrics is None:
        raise InputError(f"{path}: {option} got a model directory; evaluate it first (--model "
                         f"{path} --output-dir DIR) and compare DIR")
    name = metrics.get("model") if isinstance(metrics.get("model"), str) else path
    return {"name": _model_name(name) + report.as_authors_tag(metrics), "metrics": metrics,
            "dir": _eval_dir(path), "path": path}


def _distinct_evaluations(runs, baseline):
    """Duplicates are not seeds: the same evaluation given twice to --compare (the same path, its
    metrics.json, a link) is refused; the --baseline met again among --compare (a glob such as
    runs/*/eval) is left out there. Returns (runs, paths left out)."""
    identity = lambda run: os.path.realpath(os.path.join(run["dir"], "metrics.json")) \
        if os.path.isdir(run["path"]) else os.path.realpath(run["path"])  # noqa: E731
    seen, kept, dropped = {}, [], []
    base = identity(baseline) if baseline else None
    for run in runs:
        key = identity(run)
        if key == base:
            dropped.append(run["path"])
            continue
        if key in seen:
            raise InputError(f"--compare: {seen[key]} and {run['path']} are the same evaluation "
                             f"({key}); give each once (the same run twice is not two seeds)")
        seen[key] = run["path"]
        kept.append(run)
    return kept, dropped


def _eval_dir(path):
    """The evaluation directory of a --compare / --baseline path (itself, or its metrics.json's)."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _unique_names(runs):
    seen = {}
    for run in runs:
        seen[run["name"]] = seen.get(run["name"], 0) + 1
        if seen[run["name"]] > 1:
            run["name"] += f" ({seen[run['name']]})"


def _safe(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _saved_predictions(run, groups):
    """The predictions files of an evaluation directory: {group: {key: {id: text}}}."""
    out = {}
    for group, keys in groups.items():
        out[group] = {}
        for key in keys:
            path = os.path.join(run["dir"], "predictions", group, f"{key}.json")
            if not os.path.isfile(path):
                raise InputError(f"{path}: not found; significance needs the saved predictions of "
                                 f"{run['path']} (or pass --bootstrap 0 to compare tables only)")
            out[group][key] = read_predictions(path)
    return out


def _gold_for(a, b, args):
    """The gold examples of the data sets both evaluations scored (their predictions loaded into
    a and b); refuses evaluations with nothing in shared or with different pairs."""
    ga, gb = _tested_groups(a["metrics"]), _tested_groups(b["metrics"])
    shared = [g for g in ga if g in gb]
    if not shared:
        raise InputError(f"{a['path']} ({' '.join(ga) or 'no data set'}) and {b['path']} "
                         f"({' '.join(gb) or 'no data set'}) share no evaluated data set or split")
    for g in shared:
        if ga[g] != gb[g]:
            raise InputError(f"{g}: {a['path']} and {b['path']} scored different pairs "
                             f"({' '.join(ga[g])} vs {' '.join(gb[g])})")
    groups = {g: ga[g] for g in shared}
    a["predictions"], b["predictions"] = _saved_predictions(a, groups), _saved_predictions(b, groups)
    recorded = a["metrics"].get("data") or {}           # where the evaluation read its data
    source = lambda name, option, default: option or recorded.get(name) or default  # noqa: E731
    tasks, notes = [], []
    splits = [g.split("-", 1)[1] for g in groups if g.startswith("mlqa-")]
    if splits:
        tasks += _mlqa_tasks(source("mlqa", args.mlqa_dir, MLQA_DIR), True, splits, notes)
    if "xquad" in groups:
        tasks += _xquad_tasks(source("xquad", args.xquad_dir, XQUAD_DIR), True,
                              [k.split("-")[0] for k in groups["xquad"]], notes)
    if "tydiqa" in groups:
        tasks += _tydiqa_tasks(source("tydiqa", args.tydiqa_file, TYDIQA_FILE), True,
                               [k.split("-")[0] for k in groups["tydiqa"]], notes)
    return {g: {t["key"]: (t["examples"], t["lang"]) for t in tasks if t["group"] == g}
            for g in groups}


def _task_predictions(tasks):
    """{group: {key: {id: text}}} of predicted tasks (--dataset files left out)."""
    out = {}
    for t in tasks:
        if t["key"] is not None:
            out.setdefault(t["group"], {})[t["key"]] = t["predictions"]
    return out


def _saved_predictions_or_note(path, metrics, notes):
    """A baseline given as metrics.json / evaluation directory: its saved predictions, or None
    (with a note) when they are not beside it."""
    run = {"dir": _eval_dir(path), "path": path}
    try:
        return _saved_predictions(run, _tested_groups(metrics))
    except InputError:
        _note(notes, f"no saved predictions beside {path}: no significance, and the difference "
                     "maps carry no marks")
        return None


def _baseline_significance(args, tasks, base_predictions, base_name, name):
    """Model mode with --baseline: the model (B) against the baseline (A) on the data sets both
    have, from the tasks just predicted."""
    if base_predictions is None or args.bootstrap == 0:
        return []
    gold = {t["group"]: {} for t in tasks if t["key"] is not None and t["group"] in base_predictions}
    for t in tasks:
        if t["group"] in gold and t["key"] in base_predictions[t["group"]]:
            gold[t["group"]][t["key"]] = (t["examples"], t["lang"])
    a = {"name": base_name, "predictions": base_predictions}
    b = {"name": name, "predictions": _task_predictions(tasks)}
    return [compare_two(a, b, gold, args.bootstrap, args.bootstrap_seed)] if gold else []


def _write_significance(out_dir, comparisons, args):
    if comparisons:
        atomic_write_json(os.path.join(out_dir, "significance.json"), {
            "method": {"test": "paired bootstrap over instances (ids shared across pairs), "
                               "percentile interval, two-sided p of the same percentile "
                               "distribution (p < 1 - confidence iff the interval excludes 0; "
                               "floored at 1/resamples)",
                       "resamples": args.bootstrap, "seed": args.bootstrap_seed,
                       "confidence": significance.CONFIDENCE,
                       "wilcoxon": "scipy.stats.wilcoxon on per-example differences, XLT "
                                   "selection before the test (for comparability only)"},
            "comparisons": comparisons}, indent=1)


# ----------------------------------------------------------------------------------------------
# Command line


def ask_mode(args):
    """--model DIR --question Q --context C (or --context-file F): the answer and its score, by
    train_qa.predict as in every evaluation (transformers 5 has no question-answering pipeline)."""
    if (args.context is None) == (args.context_file is None):
        raise InputError("--question needs one of --context TEXT or --context-file FILE" +
                         (", not both" if args.context is not None else ""))
    context = args.context
    if args.context_file is not None:
        try:
            with open(args.context_file, encoding="utf-8") as f:
                context = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{args.context_file}: cannot read ({e})") from None
    if not args.question.strip() or not context.strip():
        raise InputError("--question and the context must not be empty")
    train_qa.default_device(args.device)             # a device this machine has, or one line
    train_qa.set_matmul_precision(args.precision, args.device)
    model, tokenizer = train_qa.load_model_and_tokenizer(args.model, require_qa_head=True)
    example = {"id": "question", "question": args.question, "context": context}
    answer, score = train_qa.predict(model, tokenizer, [example], device=args.device,
                                     precision=args.precision, with_scores=True,
                                     max_query_length=args.max_query_length, windows=args.windows,
                                     answers=args.answers)["question"]
    print(json.dumps({"answer": answer, "score": round(score, 4)}, ensure_ascii=False))


def main(argv=None):
    args, parser = parse_args(argv)
    if args.model and args.question is not None:
        return ask_mode(args)
    modes = [name for name in ("model", "sweep", "compare") if getattr(args, name)]
    if modes:
        if len(modes) > 1:
            parser.error(" and ".join(f"--{m}" for m in modes) + " are separate modes")
        if not args.output_dir:
            parser.error(f"--{modes[0]} needs --output-dir")
        if not 0 <= args.bootstrap <= significance.MAX_RESAMPLES:
            parser.error(f"--bootstrap must be 0 (no significance) or a number of resamples up "
                         f"to {significance.MAX_RESAMPLES:,}")
        check_seed(args.bootstrap_seed, "--bootstrap-seed")
        train_qa.default_device(args.device)             # a device this machine has, or one line
        args.split = list(dict.fromkeys(args.split))
        check_writable(args.output_dir)
        with lock_output_dir(os.path.realpath(args.output_dir), args.output_dir):  # one at a time
            return {"model": model_mode, "sweep": sweep_mode, "compare": compare_mode}[modes[0]](args)
    if args.question is not None:
        parser.error("--question needs --model DIR")

    # Drop-in scoring of one predictions file (the official scripts' command lines).
    if args.dataset or args.lang:
        parser.error(f"{'--dataset' if args.dataset else '--lang'} needs --model DIR; the drop-in "
                     "form is DATASET_FILE PREDICTION_FILE ANSWER_LANGUAGE (or --squad)")
    if args.squad:
        if len(args.files) != 2:
            parser.error("--squad expects DATASET_FILE PREDICTION_FILE")
        dataset_file, prediction_file, lang = *args.files, SQUAD
    else:
        if len(args.files) != 3:
            parser.error("expected DATASET_FILE PREDICTION_FILE ANSWER_LANGUAGE")
        dataset_file, prediction_file, lang = args.files
    scores = score_files(dataset_file, prediction_file, lang)
    print(json.dumps({"exact_match": scores["exact_match"], "f1": scores["f1"]}))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    d = parser.add_argument_group("scoring a predictions file (the official scripts' forms)")
    d.add_argument("files", nargs="*", metavar="FILE",
                   help="DATASET_FILE PREDICTION_FILE ANSWER_LANGUAGE (or, with --squad, "
                        "DATASET_FILE PREDICTION_FILE)")
    d.add_argument("--squad", action="store_true", help="SQuAD v1.1 rules")
    o = parser.add_argument_group("output (--model, --compare and --sweep)")
    o.add_argument("--output-dir", help="where metrics.json, predictions/, figures, summary.md go")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation (evaluate_mlqa.py's own output) in "
                        "--output-dir; never anything else")
    m = parser.add_argument_group("model mode (--model DIR --output-dir OUT)")
    m.add_argument("--model", help="a fine-tuned QA model directory to evaluate")
    m.add_argument("--split", nargs="+", choices=["dev", "test"], default=["dev", "test"])
    m.add_argument("--skip", nargs="+", choices=["mlqa", "xquad", "tydiqa"], default=[],
                   help="data sets not to evaluate")
    m.add_argument("--dataset", help="also score one SQuAD-format file (with --lang L or --squad)")
    m.add_argument("--lang", help="answer language of --dataset (MLQA rules)")
    m.add_argument("--baseline", help="metrics.json, its evaluation directory, or a model "
                                      "directory: adds Fig. 3/9 difference heat maps (with "
                                      "--compare: the model every other is compared with)")
    m.add_argument("--hidden-knowledge", default="em", choices=HIDDEN_CRITERIA,
                   help="Table 1: a top-10 answer is correct by exact match with any gold answer "
                        "(default), by F1, or raw: equal to the first gold answer (the authors')")
    m.add_argument("--hidden-knowledge-f1", type=float, default=50.0,
                   help="F1 threshold (percent) with --hidden-knowledge f1")
    m.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE,
                   help="inference batch (default: 128 on CUDA, 16 on CPU)")
    m.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    m.add_argument("--precision", default="auto", choices=train_qa.PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on a CPU; fp32: true fp32 matmuls; "
                        "tf32: TF32 matmuls on Ampere+")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (needs a C compiler on a CPU; the first "
                        "batches compile); off by default")
    m.add_argument("--max-query-length", type=int, default=train_qa.MAX_QUERY_LENGTH,
                   help="question tokens kept (the authors' 64); longer questions are cut")
    m.add_argument("--windows", choices=train_qa.WINDOWS, default="fast",
                   help="legacy: a window starts every 128 tokens (the authors' processor)")
    m.add_argument("--answers", choices=train_qa.ANSWERS, default="offsets",
                   help="legacy: the authors' post-processing (top 20 over all positions, "
                        "max-context rule, text rebuilt from tokens)")
    m.add_argument("--as-authors", action="store_true",
                   help="the authors' evaluation: " + " ".join(
                       f"--{k.replace('_', '-')} {v}" for k, v in AS_AUTHORS.items()) +
                        "; options given explicitly win")
    w = parser.add_argument_group("data locations (model mode; --compare reads the gold answers "
                                  "from the same files)")
    w.add_argument("--mlqa-dir", default=None, help=f"MLQA v1 root (default {MLQA_DIR})")
    w.add_argument("--xquad-dir", default=None, help=f"default {XQUAD_DIR}")
    w.add_argument("--xquad-langs", nargs="+", default=XQUAD_ZERO_SHOT)
    w.add_argument("--tydiqa-file", default=None, help=f"default {TYDIQA_FILE}")
    w.add_argument("--tydiqa-langs", nargs="+", default=TYDIQA_ZERO_SHOT,
                   help="TyDiQA-GoldP languages (codes), or 'all'")
    c = parser.add_argument_group("comparison (--compare EVAL ... [--baseline EVAL] --output-dir "
                                  "OUT)")
    c.add_argument("--compare", nargs="+", metavar="EVAL",
                   help="evaluation directories (or their metrics.json): one summary.md with a "
                        "row per model, and each model's difference to --baseline (else to the "
                        "first) with its 95%% confidence interval (significance.json)")
    c.add_argument("--bootstrap", type=int, default=significance.N_RESAMPLES,
                   help="resamples of the paired bootstrap, also for --model with --baseline "
                        "(0: tables only, no significance)")
    c.add_argument("--bootstrap-seed", type=int, default=significance.SEED)
    s = parser.add_argument_group("sweep (--sweep RUN_DIR ... --output-dir OUT)")
    s.add_argument("--sweep", nargs="+", metavar="RUN_DIR",
                   help="summarise distill.py runs (args.json, and RUN/eval/metrics.json, else "
                        "RUN/dev_metrics.jsonl): sweep.md, Fig. 5, 6, 10, 11")
    s.add_argument("--fig5-t", type=float, default=None,
                   help="temperature of the Fig. 5 curves (default: most common per mode)")
    q = parser.add_argument_group("one question (--model DIR --question Q --context C)")
    q.add_argument("--question", help="with --model: ask the model this one question")
    q.add_argument("--context", help="the context of --question")
    q.add_argument("--context-file", help="a text file holding the context of --question")
    return parse_with_preset(parser, argv, AS_AUTHORS), parser


def cli():
    run_main(main, memory_hint=MEMORY_HINT)


if __name__ == "__main__":
    cli()
