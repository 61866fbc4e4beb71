"""Small pieces every script shares: the languages and data locations, user-facing errors, atomic
writes, SQuAD-format reading.

A user error (missing file, malformed JSON, missing field, impossible option) raises InputError;
`run_main` turns it into one line on stderr and exit status 2, never a traceback. Every output is
written under a temporary name and renamed into place, so an interrupted or failed run never
leaves a half-written file behind.
"""
import argparse
import atexit
import contextlib
import copy
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading


# -------------------------------------------------------------------- shared facts (one home each)
LANGUAGES = ["en", "es", "de", "ar", "vi", "hi", "zh"]  # MLQA's, = the training languages (Sec. 5.1);
                                                        # the paper's figure order
SEED_LANGUAGE = "en"                                    # the source language of Eq. 3
XQUAD_ZERO_SHOT = ["el", "ru", "tr", "th"]              # Table 4: XQuAD languages not trained on
TYDIQA_ZERO_SHOT = ["bn", "fi", "id", "ko", "ru", "sw", "te"]  # Table 4 (the paper's "in" = id)
TYDIQA_ID_PREFIXES = {"arabic": "ar", "bengali": "bn", "english": "en", "finnish": "fi",
                      "indonesian": "id", "korean": "ko", "russian": "ru", "swahili": "sw",
                      "telugu": "te"}                   # a TyDiQA id starts with its language's name

# Data locations, relative to the directory every command runs from (the repository root).
DATA_DIR = "data"
XQUAD_DIR = os.path.join(DATA_DIR, "xquad")                         # shipped
SQUAD_TRAIN_FILE = os.path.join(DATA_DIR, "squad", "train-v1.1.json")  # data/download.py squad
MLQA_DIR = os.path.join(DATA_DIR, "mlqa", "MLQA_V1")                # data/download.py mlqa
TYDIQA_FILE = os.path.join(DATA_DIR, "tydiqa", "tydiqa-goldp-v1.1-dev.json")  # ... tydiqa

# OpenMP (torch's libgomp on a CPU): by default a thread that waits at the end of a parallel
# region spins 300,000 times (~3 ms) before it sleeps. With another busy process on the cores the
# spinning thread holds the core its partner needs, and each of the thousands of parallel regions
# of a step waits for the scheduler: on 2 cores with one competing process a phase-2 step ran 5x
# (fp32) and 8x (bf16: more, smaller regions) slower than idle. 10,000 spins cost 0-3% idle and
# ran 2.2x (fp32) and 4.2x (bf16) as fast as the default with a competitor; 3,000 cost 8% idle,
# OMP_WAIT_POLICY=PASSIVE (sleep at once) 12-19% (issue 20, PERFORMANCE.md). libgomp
# reads it when it loads: the entry scripts import this module before torch. A user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK   # what open() and mkdir() would give


# Ctrl-C while a script still imports torch and transformers (its first 2-3 s, before run_main):
# a KeyboardInterrupt raised inside a C++ extension's import aborts the process ("terminate called
# after throwing ... pybind11::error_already_set", SIGABRT), and SIGTERM would end it without a
# word. So in this project's scripts (not in pytest or a user's program importing this module)
# a stop signal is only noted until run_main starts, which then ends the run with one line and
# status 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_signals_while_starting = []


def _note_signal(signum, frame):
    _signals_while_starting.append(signum)


def _is_our_script():
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return os.path.dirname(script) in (here, os.path.join(here, "data"))


if _is_our_script():
    for _signum in STOP_SIGNALS:
        if signal.getsignal(_signum) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(_signum, _note_signal)


class InputError(Exception):
    """An error the user caused and can fix; the message names the file, field or option."""


class NonFiniteLoss(Exception):
    """The loss became NaN/inf: the run stops (exit status 3), the last checkpoint as it was."""


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default (where it has one and its help does not say it), and
    the description and epilog as written."""

    def _format_action(self, action):
        if not action.help and action.option_strings and \
                action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)          # argparse prints no help line for help=None
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text \
                and action.option_strings:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit 2 (argparse prints two), and
    --help shows the defaults (DefaultsFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        """An empty value (an unset shell variable: --model "$M") is refused, not taken as the
        option's default."""
        parsed, extra = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if "" in (value if isinstance(value, list) else [value]):
                self.error(f"argument {'/'.join(action.option_strings) or action.dest}: "
                           "empty value")
        return parsed, extra


def parse_with_preset(parser, argv, preset, flag="as_authors"):
    """parser.parse_args(argv); when `flag` is set, again with `preset` as the defaults, so the
    preset's values apply and options given explicitly still win (--as-authors --answers offsets
    flips one switch back)."""
    args = parser.parse_args(argv)
    if getattr(args, flag, False):
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    return args


class Stopped(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGUSR1) outside the part of a run that saves a checkpoint
    first (rundir.StopSignals). A BaseException, like KeyboardInterrupt: cleanup code runs, and
    nothing catches it by accident."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def write_error(error):
    """One line for an OSError while reading or writing (read-only or full disk, a file in the
    way): what could not be written and why."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        reason += "; what was there before is intact"
    return f"{error.filename or 'output'}: {reason}"


def run_main(main, resume_hint=None, memory_hint=None):
    """Run a script's main(). A user error is one stderr line and exit status 2, and so is a
    failed write (read-only or full disk) and running out of GPU memory (with `memory_hint`, the
    option that makes the passes smaller); Ctrl-C and SIGTERM are one line and exit 128 + the
    signal's number (130, 143), with `resume_hint()`'s command where a run can be continued."""
    if threading.current_thread() is threading.main_thread() and \
            getattr(sys.modules.get("__main__"), "main", None) is main:
        atexit.register(_ignore_stop_signals)           # a script's own run, however it ends
    if _signals_while_starting:
        signum = _signals_while_starting[0]
        print(f"\ninterrupted ({signal.Signals(signum).name}) while starting; nothing was "
              "written", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # the imports are done: from here a stop signal raises where the run is (KeyboardInterrupt,
        # Stopped), so every cleanup runs; training defers it to a checkpoint (rundir.StopSignals)
        previous = {s: signal.signal(s, signal.default_int_handler if s == signal.SIGINT
                                     else _raise_stopped) for s in STOP_SIGNALS}
    try:
        _run(main, resume_hint, memory_hint)
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if previous and getattr(sys.modules.get("__main__"), "main", None) is main:
        # a script whose work is done and said: a stop signal while Python shuts down (a second
        # or more with torch loaded) ends it with status 0, not 143 and no line
        for s in STOP_SIGNALS:
            signal.signal(s, _exit_done)


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _ignore_stop_signals():
    """A script's exit handler: after the exit handlers Python puts the default action back for
    every signal it handles, then tears its modules down (about half a second with torch
    loaded), so a stop signal there would kill a complete run (status 143, no line) or change a
    stopped run's status. Nothing of the run is left to stop: ignored."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _exit_done(signum, frame):
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


def _run(main, resume_hint, memory_hint):
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        print(f"error: {out_of_memory_line(e, memory_hint)}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except BrokenPipeError:          # stdout closed early (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        if e.errno is None:
            raise
        print(f"error: {write_error(e)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Stopped) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        hint = resume_hint() if resume_hint else None
        print(f"\ninterrupted ({signal.Signals(signum).name}); nothing is half-written" +
              (f"; to continue: {hint}" if hint else ""), file=sys.stderr, flush=True)
        sys.exit(128 + signum)


def out_of_memory(error):
    """torch's out-of-memory error (a GPU's allocator; common does not import torch itself)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def out_of_memory_line(error, hint=None):
    """One line for torch's out-of-memory error: what it asked for of how much, and what to change
    (the options of the script that ran out). The last checkpoint is as it was."""
    text = str(error)
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
    total = re.search(r"total capacity of ([\d.]+ \w+)", text)
    what = (f"asked for {asked[1]}" + (f" of the GPU's {total[1]}" if total else "") if asked
            else " ".join(text.split())[:120])
    return (f"out of memory ({what}); " + (hint or "smaller batches may fit") +
            "; the last checkpoint, if any, is as it was")


def save_tokenizer(tokenizer, directory):
    """tokenizer.save_pretrained, readable by transformers 4.x and 5.x whichever wrote it: 5.x
    names a generic fast tokenizer's class (the tiny models', or one with only tokenizer.json)
    "TokenizersBackend", which 4.x does not have; its 4.x name, PreTrainedTokenizerFast, is the
    same class to 5.x. The file is rewritten as transformers writes it."""
    tokenizer.save_pretrained(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):             # a tokenizer that keeps no config: nothing to name
        return
    config = read_json(path)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True,
                                           ensure_ascii=False) + "\n")


def check_seed(seed, option="--seed"):
    """A seed every generator of a run takes (numpy's legacy one, in a checkpoint's RNG state:
    below 2^32)."""
    if not 0 <= seed < 2**32:
        raise InputError(f"{option} must be an integer in 0..{2**32 - 1}, got {seed}")


def is_number(value):
    """A JSON value that is a finite number (not a bool, a NaN or an infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def check_writable(path, need_bytes=0, what="the run's outputs"):
    """Fail now, with one line, when `path` (a directory, made later if missing) cannot be
    written, or its file system has less than need_bytes free."""
    probe = os.path.abspath(path)
    if os.path.islink(os.path.realpath(probe)):      # still a link once resolved: a loop
        raise InputError(f"{path}: a link that leads back to itself (a loop of links); "
                         "remove it or choose another path")
    while not os.path.isdir(probe):
        if os.path.exists(probe):
            raise InputError(f"{path}: is a file, not a directory" if probe == os.path.abspath(path)
                             else f"{probe}: is a file, so {path} cannot be made")
        probe = os.path.dirname(probe)
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".tmp-write-probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"{path}: cannot write there ({e.strerror})") from None
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise InputError(f"{path}: {_size(free)} free, {what} need about {_size(need_bytes)}")


def _size(n_bytes):
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary file name beside `path` to write; on success it replaces `path` in one
    rename, with the usual permissions (the umask's). A failed write (read-only or full disk)
    names `path`, leaves what was there and no temporary file. A link stays a link: what it
    points to is replaced."""
    target = os.path.realpath(path)
    if os.path.islink(target):           # still a link once resolved: a loop, never replaced
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    directory = os.path.dirname(target)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        with signals_held():             # made and known together: a Ctrl-C cannot leave it
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(target))
        os.close(fd)
        yield tmp
        os.chmod(tmp, FILE_MODE)         # mkstemp makes 0600
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from None
        raise


def atomic_write_text(path, text):
    """`text` into `path` through atomic_file."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path, obj, indent=None):
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def usual_permissions(directory):
    """Every file and directory below `directory` (links left alone) at the umask's permissions:
    a model that colleagues on a shared cluster can read, whatever mode a library wrote it with."""
    for root, dirs, files in os.walk(directory):
        for name, mode in [(d, DIR_MODE) for d in dirs] + [(f, FILE_MODE) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


@contextlib.contextmanager
def atomic_output_dir(path, overwrite=False):
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    Refuses an existing `path` unless overwrite. On failure the temporary directory is removed
    and `path` is left as it was. A link to a directory stays a link: what it points to is
    replaced.
    """
    path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: is a file, not a directory; choose another output directory")
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path}: output directory exists (pass --overwrite to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with signals_held():                 # made and known together: a Ctrl-C cannot leave it
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path))
    try:
        os.chmod(tmp, DIR_MODE)          # mkdtemp makes 0700
        yield tmp
        usual_permissions(tmp)           # safetensors writes its files 0600
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reported = re.search(r"\(os error (\d+)\)", str(e))    # safetensors' own error type
        if type(e).__name__ == "SafetensorError" and reported:   # for a full disk: "(os error 28)"
            e = OSError(int(reported.group(1)), os.strerror(int(reported.group(1))))
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise OSError(e.errno, e.strerror, path) from None    # name what was being written
        raise
    with signals_held():                 # the swap is never left half done
        if os.path.exists(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)


@contextlib.contextmanager
def signals_held():
    """SIGINT, SIGTERM and SIGUSR1 wait until the block is done, then arrive as usual: for the few
    steps that must not be split, such as making a temporary file and recording its name. (Python
    handlers, not a signal mask: another thread of the process would take a masked signal.)"""
    if threading.current_thread() is not threading.main_thread():
        yield                            # handlers can only be set from the main thread
        return
    arrived = []
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum))
                for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set in C
        if arrived:
            signal.raise_signal(arrived[0])


def _field(obj, key, path, where, kind=None):
    if not isinstance(obj, dict) or key not in obj:
        raise InputError(f"{path}: missing field '{key}' in {where}")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        raise InputError(f"{path}: field '{key}' in {where} has the wrong type")
    return value


def load_squad_examples(path, require_answers=True):
    """Read a SQuAD v1.1-format file into a flat list of examples.

    Each example: {"id", "title", "question", "context", "answers": [{"text", "answer_start"}]}.
    Every field is checked, so a malformed file fails with one message naming the field.
    """
    dataset = read_json(path)
    articles = _field(dataset, "data", path, "the top level", list)
    examples, seen = [], set()
    for a, article in enumerate(articles):
        paragraphs = _field(article, "paragraphs", path, f"data[{a}]", list)
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", path, where, str)
            for q, qa in enumerate(_field(paragraph, "qas", path, where, list)):
                qwhere = f"{where}.qas[{q}]"
                qid = _field(qa, "id", path, qwhere, str)
                question = _field(qa, "question", path, qwhere, str)
                answers = qa.get("answers", []) if not require_answers else \
                    _field(qa, "answers", path, qwhere, list)
                for n, ans in enumerate(answers):
                    _field(ans, "text", path, f"{qwhere}.answers[{n}]", str)
                    _field(ans, "answer_start", path, f"{qwhere}.answers[{n}]", int)
                if qid in seen:
                    raise InputError(f"{path}: duplicate question id '{qid}' at {qwhere}")
                seen.add(qid)
                examples.append({"id": qid, "title": article.get("title", ""),
                                 "question": question, "context": context,
                                 "answers": [{"text": x["text"], "answer_start": x["answer_start"]}
                                             for x in answers]})
    return examples


def examples_to_squad(examples, version="1.1"):
    """The inverse of load_squad_examples: a SQuAD dict, one article per title; examples sharing
    a title and a context share one paragraph. Keys other than the SQuAD ones are dropped."""
    data, articles, paragraphs = [], {}, {}
    for ex in examples:
        title = ex.get("title", "")
        if title not in articles:
            articles[title] = {"title": title, "paragraphs": []}
            data.append(articles[title])
        key = (title, ex["context"])
        if key not in paragraphs:
            paragraphs[key] = {"context": ex["context"], "qas": []}
            articles[title]["paragraphs"].append(paragraphs[key])
        paragraphs[key]["qas"].append({"id": ex["id"], "question": ex["question"],
                                       "answers": ex["answers"]})
    return {"version": version, "data": data}


# -------------------------------------------------------------------- library modules run directly
SCRIPTS = ["sample.py", "train_qa.py", "distill.py", "evaluate_mlqa.py", "bench.py",
           "data/download.py"]                  # the files with a command line (and --help)


def not_a_script(path):
    """What a library module says when it is run as a script (with --help or anything else):
    one line on stderr, exit status 2, instead of silently doing nothing."""
    print(f"error: {os.path.basename(path)} is a library module, not a script; the scripts "
          f"are {', '.join(SCRIPTS)} (each prints its usage with --help)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    not_a_script(__file__)
