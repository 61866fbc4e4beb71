"""Evaluation: official-equivalent MLQA v1 and SQuAD v1.1 scoring (paper Sec. 5.1, Table 3).

Scoring forms (drop-in replacements for the official scripts; one JSON line on stdout):

    python evaluate_mlqa.py DATASET_FILE PREDICTION_FILE ANSWER_LANGUAGE   # MLQA v1 rules
    python evaluate_mlqa.py --squad DATASET_FILE PREDICTION_FILE           # SQuAD v1.1 rules

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
import functools
import json
import os
import re
import string
import sys
import unicodedata
from collections import Counter

from common import ArgumentParser, InputError, load_squad_examples, read_json, run_main

MLQA_LANGUAGES = ["en", "es", "de", "ar", "vi", "hi", "zh"]
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
    if lang != SQUAD and lang not in MLQA_LANGUAGES:
        raise InputError(f"unknown answer language '{lang}' (expected one of "
                         f"{' '.join(MLQA_LANGUAGES)}, or --squad)")


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


def evaluate_predictions(examples_or_dataset, predictions, lang, report_unanswered=True,
                         name="dataset"):
    """Official-equivalent scores of `predictions` ({id: text}) -> {"exact_match", "f1", "n"}.

    `lang` is the answer (context) language, or "squad" for the SQuAD v1.1 rules. Unanswered
    questions score 0 and, with report_unanswered, are named on stderr like the official scripts.
    `name` (e.g. the dataset's path) starts the message of an InputError.
    """
    _check_lang(lang)
    em = f1 = 0.0
    total = 0
    for qa, qid in _questions(examples_or_dataset, name):
        total += 1
        if qid not in predictions:
            if report_unanswered:
                print(f"Unanswered question {qid} will receive score 0.", file=sys.stderr)
            continue
        prediction = predictions[qid]
        if not isinstance(prediction, str):
            raise InputError(f"predictions: answer for question '{qid}' is not a string")
        if "answers" not in qa:
            raise InputError(f"{name}: missing field 'answers' in question '{qid}'")
        golds = [a["text"] for a in qa["answers"]]
        if not golds:
            raise InputError(f"{name}: question '{qid}' has no gold answers")
        em += max(exact_match_score(prediction, g, lang) for g in golds)
        f1 += max(f1_score(prediction, g, lang) for g in golds)
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


def score_files(dataset_file, prediction_file, lang):
    """The drop-in form: score one predictions file against one SQuAD-format dataset file."""
    _check_lang(lang)
    examples = load_squad_examples(dataset_file)
    predictions = read_predictions(prediction_file)
    return evaluate_predictions(examples, predictions, lang, name=dataset_file)


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="DATASET_FILE PREDICTION_FILE ANSWER_LANGUAGE (or, with --squad, "
                             "DATASET_FILE PREDICTION_FILE)")
    parser.add_argument("--squad", action="store_true", help="SQuAD v1.1 rules")
    args = parser.parse_args(argv)

    # Drop-in scoring of one predictions file (the official scripts' command lines).
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


if __name__ == "__main__":
    run_main(main)
