"""Download the evaluation and training data sets from their official locations, verified.

    python data/download.py all                      # squad mlqa tydiqa
    python data/download.py squad mlqa [--data-dir data] [--base-url URL] [--force]

- squad:  SQuAD v1.1 train and dev          -> data/squad/{train-v1.1.json,dev-v1.1.json}
- mlqa:   MLQA v1 (MLQA_V1.zip), unpacked   -> data/mlqa/MLQA_V1/{dev,test}/<split>-context-<c>-question-<q>.json
- tydiqa: TyDiQA-GoldP v1.1 dev             -> data/tydiqa/tydiqa-goldp-v1.1-dev.json, and split by the
          language named by the id prefix   -> data/tydiqa/tydiqa.<lang>.dev.json

Every file is downloaded to a temporary name, checked (it parses, has the SQuAD structure and, from
the official locations, the published question counts) and only then renamed into place, so an
interrupted or corrupt download never leaves anything behind. Re-running skips what is already
there and valid. --base-url fetches every file as URL/<file name> instead (a mirror, or the local
test server); question counts are then checked only with --check-counts.
"""
import contextlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (DATA_DIR, LANGUAGES, TYDIQA_ID_PREFIXES, ArgumentParser,  # noqa: E402
                    InputError, check_writable, load_squad_examples, read_json, run_main)

CHUNK = 1 << 16
TIMEOUT = 60  # seconds without data before a download fails

SQUAD_FILES = {  # file name -> (official URL, question count)
    "train-v1.1.json": ("https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json", 87599),
    "dev-v1.1.json": ("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json", 10570),
}
MLQA_URL = "https://dl.fbaipublicfiles.com/MLQA/MLQA_V1.zip"
# Questions of the same-language files <split>-context-<l>-question-<l>.json (MLQA paper, Table 4).
MLQA_COUNTS = {"dev": {"en": 1148, "de": 512, "es": 500, "ar": 517, "zh": 504, "vi": 511, "hi": 507},
               "test": {"en": 11590, "de": 4517, "es": 5253, "ar": 5335, "zh": 5137, "vi": 5495,
                        "hi": 4918}}
TYDIQA_FILE = "tydiqa-goldp-v1.1-dev.json"
TYDIQA_URL = "https://storage.googleapis.com/tydiqa/v1.1/" + TYDIQA_FILE
TYDIQA_COUNTS = {"ar": 921, "bn": 113, "en": 440, "fi": 782, "id": 565, "ko": 276, "ru": 812,
                 "sw": 499, "te": 669}  # 5,077 in all


# ----------------------------------------------------------------------------------------------
# Fetching and verification


def fetch(url, path):
    """Download url to path (a temporary name chosen by the caller) with a progress bar; a short
    body (fewer bytes than Content-Length) or a network error raises InputError."""
    from tqdm import tqdm
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response, open(path, "wb") as f:
            size = response.headers.get("Content-Length")
            size = int(size) if size and size.isdigit() else None
            got = 0
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=os.path.basename(url), disable=None) as bar:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise InputError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise InputError(f"{url}: download failed ({type(e).__name__}: {reason})") from None
    if size is not None and got != size:
        raise InputError(f"{url}: download truncated ({got} of {size} bytes)")


def count_questions(path):
    return len(load_squad_examples(path))  # parses and checks every SQuAD field


def verify_squad(path, expected=None):
    n = count_questions(path)
    if expected is not None and n != expected:
        raise InputError(f"{path}: {n} questions, expected {expected}")
    return n


def _fail_cleanup(*paths):
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.unlink(p)


def _tmp_name(directory, name):
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp-{name}-")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the data is not
    return tmp


@contextlib.contextmanager
def _output_dir(path):
    """Create path (and missing parents); on failure remove again those that were created and
    are still empty, so a failed download leaves nothing behind."""
    created, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


def _checked(url, tmp, verify, *args):
    """verify(*args) on a download; a failure names the URL, not the temporary file."""
    try:
        return verify(*args)
    except InputError as e:
        message = str(e).replace(tmp + os.sep, "").replace(tmp, os.path.basename(url))
        raise InputError(f"{url}: rejected: {message}") from None


def _url(base_url, name, official):
    return official if base_url is None else base_url.rstrip("/") + "/" + name


# ----------------------------------------------------------------------------------------------
# The three data sets


def download_squad(data_dir, base_url=None, check_counts=True, force=False):
    out_dir = os.path.join(data_dir, "squad")
    for name, (official, expected) in SQUAD_FILES.items():
        target, expected = os.path.join(out_dir, name), expected if check_counts else None
        if not force and _valid(verify_squad, target, expected):
            print(f"{target}: present and valid, skipped")
            continue
        with _output_dir(out_dir):
            tmp = _tmp_name(out_dir, name)
            try:
                url = _url(base_url, name, official)
                fetch(url, tmp)
                n = _checked(url, tmp, verify_squad, tmp, expected)
                os.replace(tmp, target)
            except BaseException:
                _fail_cleanup(tmp)
                raise
        print(f"{target}: {n} questions")


def verify_mlqa(root, check_counts=True):
    """root = .../MLQA_V1 with dev/ and test/ holding the 49 pair files each."""
    total = 0
    for split in ("dev", "test"):
        for c in LANGUAGES:
            for q in LANGUAGES:
                path = os.path.join(root, split, f"{split}-context-{c}-question-{q}.json")
                if not os.path.isfile(path):
                    raise InputError(f"{path}: missing from the MLQA archive")
                n = count_questions(path)
                expected = MLQA_COUNTS[split][c] if check_counts and c == q else None
                if expected is not None and n != expected:
                    raise InputError(f"{path}: {n} questions, expected {expected}")
                total += n
    return total


MLQA_FILE = re.compile(r"(dev|test)/(dev|test)-context-[a-z]{2}-question-[a-z]{2}\.json")


def _check_only_mlqa(target):
    """An MLQA_V1 directory to replace (--force, or incomplete) must hold nothing but MLQA's own
    files: a user's file in it makes the download stop with one line instead."""
    for directory, _, names in os.walk(target):
        for name in names:
            rel = os.path.relpath(os.path.join(directory, name), target).replace(os.sep, "/")
            if not MLQA_FILE.fullmatch(rel):
                raise InputError(f"{os.path.join(target, rel)}: not an MLQA v1 file, so {target} "
                                 "is not replaced; move it away, or remove the directory yourself")


def download_mlqa(data_dir, base_url=None, check_counts=True, force=False):
    out_dir = os.path.join(data_dir, "mlqa")
    target = os.path.join(out_dir, "MLQA_V1")
    if not force and _valid(verify_mlqa, target, check_counts):
        print(f"{target}: present and valid, skipped")
        return
    if os.path.exists(target):
        _check_only_mlqa(target)         # before 76 MB of download, not after
    with _output_dir(out_dir):
        n = _download_mlqa(out_dir, target, base_url, check_counts)
    print(f"{target}: 98 files, {n} questions")


def _download_mlqa(out_dir, target, base_url, check_counts):
    tmp_zip = _tmp_name(out_dir, "MLQA_V1.zip")
    tmp_dir = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-MLQA_V1-")
    try:
        url = _url(base_url, "MLQA_V1.zip", MLQA_URL)
        fetch(url, tmp_zip)
        try:
            with zipfile.ZipFile(tmp_zip) as z:
                for member in z.namelist():  # refuse paths that would leave tmp_dir
                    if member.startswith("/") or ".." in member.split("/"):
                        raise InputError(f"{url}: unsafe path in archive: {member}")
                bad = z.testzip()
                if bad is not None:
                    raise InputError(f"{url}: corrupt archive member {bad}")
                z.extractall(tmp_dir)
        except (zipfile.BadZipFile, EOFError) as e:
            raise InputError(f"{url}: not a valid zip archive ({e})") from None
        root = os.path.join(tmp_dir, "MLQA_V1")
        if not os.path.isdir(root):
            raise InputError(f"{url}: archive has no MLQA_V1/ directory")
        n = _checked(url, tmp_dir, verify_mlqa, root, check_counts)
        if os.path.exists(target):       # MLQA's files alone: _check_only_mlqa, at the start
            shutil.rmtree(target)
        os.replace(root, target)
    finally:
        _fail_cleanup(tmp_zip, tmp_dir)
    return n


def split_tydiqa(path, check_counts=True):
    """{lang: SQuAD dict} split by the language named by each id's prefix ('arabic-...' -> ar)."""
    count_questions(path)  # parses, checks the structure
    dataset = read_json(path)
    out = {}
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                prefix = qa["id"].split("-", 1)[0]
                if prefix not in TYDIQA_ID_PREFIXES:
                    raise InputError(f"{path}: question id '{qa['id']}' names no known language")
                lang = TYDIQA_ID_PREFIXES[prefix]
                split = out.setdefault(lang, {"version": dataset.get("version", "1.1"),
                                              "data": [], "_last": None})
                if split["_last"] is not paragraph:  # copy the article/paragraph skeleton
                    split["data"].append({**{k: v for k, v in article.items() if k != "paragraphs"},
                                          "paragraphs": [{**{k: v for k, v in paragraph.items()
                                                             if k != "qas"}, "qas": []}]})
                    split["_last"] = paragraph
                split["data"][-1]["paragraphs"][0]["qas"].append(qa)
    for split in out.values():
        del split["_last"]
    if check_counts:
        counts = {lang: sum(len(p["qas"]) for a in d["data"] for p in a["paragraphs"])
                  for lang, d in out.items()}
        if counts != TYDIQA_COUNTS:
            raise InputError(f"{path}: questions per language {counts}, expected {TYDIQA_COUNTS}")
    return out


def verify_tydiqa(out_dir, check_counts=True):
    full = os.path.join(out_dir, TYDIQA_FILE)
    if not os.path.isfile(full):
        raise InputError(f"{full}: file not found")
    splits = split_tydiqa(full, check_counts)
    for lang, dataset in splits.items():
        path = os.path.join(out_dir, f"tydiqa.{lang}.dev.json")
        if not os.path.isfile(path):
            raise InputError(f"{path}: file not found")
        n = count_questions(path)
        if n != sum(len(p["qas"]) for a in dataset["data"] for p in a["paragraphs"]):
            raise InputError(f"{path}: does not match {full}")
    return sorted(splits)


def download_tydiqa(data_dir, base_url=None, check_counts=True, force=False):
    out_dir = os.path.join(data_dir, "tydiqa")
    if not force and _valid(verify_tydiqa, out_dir, check_counts):
        print(f"{out_dir}: present and valid, skipped")
        return
    with _output_dir(out_dir):
        splits = _download_tydiqa(out_dir, base_url, check_counts)
    n = {lang: sum(len(p["qas"]) for a in d["data"] for p in a["paragraphs"])
         for lang, d in sorted(splits.items())}
    print(f"{out_dir}: {sum(n.values())} questions, per language {n}")


def _download_tydiqa(out_dir, base_url, check_counts):
    tmp = _tmp_name(out_dir, TYDIQA_FILE)
    written = []
    try:
        url = _url(base_url, TYDIQA_FILE, TYDIQA_URL)
        fetch(url, tmp)
        splits = _checked(url, tmp, split_tydiqa, tmp, check_counts)
        for lang, dataset in sorted(splits.items()):  # each split: temporary name, then rename
            part = _tmp_name(out_dir, f"tydiqa.{lang}.dev.json")
            written.append(part)
            with open(part, "w", encoding="utf-8") as f:
                json.dump(dataset, f, ensure_ascii=False)
        for part, lang in zip(written, sorted(splits)):
            os.replace(part, os.path.join(out_dir, f"tydiqa.{lang}.dev.json"))
        os.replace(tmp, os.path.join(out_dir, TYDIQA_FILE))
    finally:
        _fail_cleanup(tmp, *written)
    return splits


def _valid(verify, *args):
    try:
        verify(*args)
        return True
    except (InputError, OSError, KeyError, TypeError, ValueError):
        return False


DATASETS = {"squad": download_squad, "mlqa": download_mlqa, "tydiqa": download_tydiqa}


def download(names, data_dir=DATA_DIR, base_url=None, check_counts=None, force=False):
    """Fetch the named data sets ('squad', 'mlqa', 'tydiqa' or 'all') into data_dir.

    check_counts=None checks the published question counts only for the official locations
    (base_url None)."""
    names = list(DATASETS) if "all" in names else list(dict.fromkeys(names))
    for name in names:
        if name not in DATASETS:
            raise InputError(f"unknown data set '{name}' (expected {' '.join(DATASETS)} or all)")
    if check_counts is None:
        check_counts = base_url is None
    check_writable(data_dir, what="the downloads")   # before minutes of downloading, not after
    for name in names:
        DATASETS[name](data_dir, base_url=base_url, check_counts=check_counts, force=force)


def main(argv=None):
    parser = ArgumentParser(description="Download SQuAD v1.1, MLQA v1 and TyDiQA-GoldP v1.1.")
    parser.add_argument("datasets", nargs="*", default=["all"], metavar="DATASET",
                        help="squad mlqa tydiqa, or all (the default)")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--base-url", default=None,
                        help="fetch every file as URL/<file name> instead of the official URLs")
    parser.add_argument("--check-counts", action="store_true",
                        help="check the published question counts also with --base-url")
    parser.add_argument("--force", action="store_true", help="download even if present and valid")
    args = parser.parse_args(argv)
    download(args.datasets or ["all"], args.data_dir, args.base_url,
             check_counts=True if args.check_counts else None, force=args.force)


if __name__ == "__main__":
    run_main(main)
