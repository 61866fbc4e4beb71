"""Cross-lingual sampling of XQuAD training examples (paper Sec. 4.2, Eq. 3).

    python sample.py --ntl 5 --seed 3 --output data/xquad-ntl5-seed3.json
    python sample.py --ntl 3 --seed 3 --output F [--xquad-dir data/xquad] [--languages en es de ar vi hi zh]

For each XQuAD question id, draw `ntl` target languages uniformly without replacement from the
non-English training languages, add the seed language en, and emit one example for every ordered
pair (question language q, context language c) of that set (Eq. 3): (1+ntl)^2 examples per id.
The context and the answers come from language c, the question from language q; the example id is
`{xquad_id}_{q}-{c}`. With the 1,190 XQuAD ids, ntl=3 gives 19,040 examples and ntl=5 42,840
(Table 2). The sample depends on --seed alone: languages are iterated in the fixed order of
--languages (the authors' code draws from a Python set, which also depends on PYTHONHASHSEED).

The output is a SQuAD v1.1-format file (one paragraph per distinct context).
"""
import contextlib
import os
import re
from collections import Counter

import common  # noqa: F401 (first: a Ctrl-C while numpy imports is noted, not a traceback)
import numpy as np

from common import (LANGUAGES, SEED_LANGUAGE, XQUAD_DIR, ArgumentParser, InputError,
                    atomic_write_json, check_seed, examples_to_squad, load_squad_examples,
                    run_main)

NTL = 5
SEED = 3
SAMPLE_ID = re.compile(r".+_[a-z]{2,3}-[a-z]{2,3}")   # {xquad_id}_{q}-{c}: every id of a sample


def load_xquad(xquad_dir, languages):
    """{lang: {id: flat example}} for the XQuAD files of `languages`, all holding the same ids."""
    by_lang, reference = {}, None
    for lang in languages:
        path = os.path.join(xquad_dir, f"xquad.{lang}.json")
        if not os.path.isfile(path):
            raise InputError(f"{path}: file not found (no XQuAD data for language '{lang}')")
        examples = load_squad_examples(path)
        by_lang[lang] = {ex["id"]: ex for ex in examples}
        if reference is None:
            reference = (path, set(by_lang[lang]))
        elif set(by_lang[lang]) != reference[1]:
            raise InputError(f"{path}: question ids differ from those of {reference[0]}")
    return by_lang


def sample_cross_lingual(xquad_dir=XQUAD_DIR, ntl=NTL, seed=SEED, languages=LANGUAGES):
    """Eq. 3: the cross-lingual training examples, a flat list (common.load_squad_examples shape)
    with ids `{xquad_id}_{q}-{c}` and extra keys "question_lang", "context_lang"."""
    languages = list(languages)
    if SEED_LANGUAGE not in languages:
        raise InputError(f"--languages must include the seed language '{SEED_LANGUAGE}'")
    if len(set(languages)) != len(languages):
        raise InputError(f"--languages lists a language twice: {' '.join(languages)}")
    targets = [lang for lang in languages if lang != SEED_LANGUAGE]  # fixed order
    if not isinstance(ntl, (int, np.integer)) or not 0 <= ntl <= len(targets):
        raise InputError(f"--ntl must be an integer in 0..{len(targets)} for {len(languages)} "
                         f"languages, got {ntl}")
    if not isinstance(seed, (int, np.integer)):
        raise InputError(f"--seed must be an integer, got {seed}")
    check_seed(seed)
    if not os.path.isdir(xquad_dir):
        raise InputError(f"{xquad_dir}: XQuAD directory not found (--xquad-dir)")
    by_lang = load_xquad(xquad_dir, languages)
    rng = np.random.default_rng(seed)
    examples = []
    for qid in by_lang[SEED_LANGUAGE]:  # the order of the English file
        drawn = set(rng.choice(len(targets), size=ntl, replace=False).tolist())
        chosen = [SEED_LANGUAGE] + [t for i, t in enumerate(targets) if i in drawn]
        for q in chosen:
            for c in chosen:
                ctx = by_lang[c][qid]
                examples.append({
                    "id": f"{qid}_{q}-{c}", "title": ctx["title"],
                    "question": by_lang[q][qid]["question"], "context": ctx["context"],
                    "answers": [dict(a) for a in ctx["answers"]],
                    "question_lang": q, "context_lang": c})
    return examples


def is_sample(path):
    """Whether `path` is a file this script wrote: SQuAD format, every id `{xquad_id}_{q}-{c}`
    (--overwrite replaces nothing else, such as an XQuAD file given by mistake)."""
    with contextlib.suppress(InputError):
        ids = [ex["id"] for ex in load_squad_examples(path)]
        return bool(ids) and all(SAMPLE_ID.fullmatch(i) for i in ids)
    return False


def main(argv=None):
    parser = ArgumentParser(description="Cross-lingual sampling of XQuAD (paper Sec. 4.2, Eq. 3)")
    parser.add_argument("--ntl", type=int, default=NTL,
                        help="number of target languages drawn per question (0..6)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--output", required=True, help="SQuAD-format output file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier sample in --output; never any other file")
    parser.add_argument("--xquad-dir", default=XQUAD_DIR)
    parser.add_argument("--languages", nargs="+", default=LANGUAGES,
                        help="training languages, in this fixed order; must include en")
    args = parser.parse_args(argv)
    if os.path.isdir(args.output):
        raise InputError(f"{args.output}: is a directory (--output must be a file)")
    if os.path.exists(args.output) and not (args.overwrite and is_sample(args.output)):
        raise InputError(f"{args.output}: exists" + (" and is not a sample written by sample.py; "
                         "not replaced: choose another --output" if args.overwrite else
                         " (--overwrite replaces an earlier sample)"))
    examples = sample_cross_lingual(args.xquad_dir, args.ntl, args.seed, args.languages)
    atomic_write_json(args.output, examples_to_squad(examples))
    print(f"wrote {len(examples)} examples ({len({ex['id'].rsplit('_', 1)[0] for ex in examples})}"
          f" XQuAD ids, ntl={args.ntl}, seed={args.seed}) to {args.output}")
    pairs = Counter((ex["question_lang"], ex["context_lang"]) for ex in examples)
    print("examples per pair (rows: question language, columns: context language)")
    print("    " + "".join(f"{c:>6}" for c in args.languages))
    for q in args.languages:
        print(f"{q:>4}" + "".join(f"{pairs[q, c]:>6}" for c in args.languages))


if __name__ == "__main__":
    run_main(main)
