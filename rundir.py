"""Run management shared by train_qa.py, distill.py and evaluate_mlqa.py: whose an output directory
is, whether it can be written, one run per directory, checkpoints that resume exactly, and stopping
on a signal with the state saved.

Rules a user can rely on:
- `--overwrite` replaces only an output this project wrote, of the same script (recognised by the
  marker file `.written-by`, or for runs made before it existed by their own files), never a
  directory that is, or holds, one of the run's inputs (`--model`, a baseline, a compared run).
  What it replaces is kept aside (`.NAME.replaced`) until the new output is complete.
- Before any work, the output location is checked: writable, and with room for what the run will
  write when that can be estimated (a checkpoint's size is known from the model).
- One run per output directory: an flock(2) on `NAME.lock` beside it for the run's life; a second
  run exits 2 naming the holder; a lock left by a killed run is recognised and taken over.
- SIGINT, SIGTERM and SIGUSR1 during training end the current optimiser step, write the checkpoint
  and exit with 128 + the signal's number (130, 143, 138) after one line saying how to resume;
  elsewhere they end the run with one line and the same status, nothing half-written.
"""
import contextlib
import datetime
import fcntl
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch

from common import (STOP_SIGNALS, InputError, Stopped, atomic_write_json, atomic_write_text,
                    check_writable, is_number, not_a_script, read_json, save_tokenizer)

MARKER = ".written-by"                      # {"script", "kind", "created"} in every output dir
WRITERS = {"train_qa": "train_qa.py", "distill": "distill.py", "evaluate": "evaluate_mlqa.py"}
SAVE_MINUTES = 30                           # --save-steps auto: a checkpoint every 30 minutes
PROGRESS_EVERY_S = 120                      # a progress line this often when stderr is no terminal
ACTIVE = {"resume_with": None}              # this process's run, once it has a checkpoint: how
                                            # to continue it (for common.run_main's last line)


# -------------------------------------------------------------------- whose is a directory
def output_kind(path):
    """'train_qa', 'distill' or 'evaluate' for an output this project wrote; None otherwise.
    Runs made before the marker existed are recognised by the files only that script writes."""
    if os.path.isfile(os.path.join(path, MARKER)):
        kind = _marker(path).get("kind")
        return kind if kind in WRITERS else None

    def has(*names):
        return all(os.path.exists(os.path.join(path, n)) for n in names)

    def json_keys(name):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                obj = json.load(f)
            return set(obj) if isinstance(obj, dict) else set()
        return set()

    if has("args.json") and {"ntl", "mode", "seed"} <= json_keys("args.json") and \
            (has("checkpoint") or has("train_log.jsonl")):
        return "distill"
    if has("train_args.json", "config.json") and "train_file" in json_keys("train_args.json"):
        return "train_qa"
    if has("metrics.json") and "model" in json_keys("metrics.json"):
        return "evaluate"
    return None


def write_marker(directory, kind, **extra):
    atomic_write_json(os.path.join(directory, MARKER), dict({
        "script": WRITERS[kind], "kind": kind,
        "created": datetime.datetime.now().isoformat(" ", "seconds")}, **extra))


def _marker(directory):
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(directory, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else {}
    return {}


# What --overwrite may delete: the names each script writes at the top of its output directory.
# Anything else there (a user's notes or analysis, another tool's files) makes --overwrite refuse,
# naming it. The model's files are recorded in the marker as they are installed
# (install_model_files); runs from before that record are recognised by save_pretrained's names.
OWN_NAMES = {
    "train_qa": r"train_args\.json|train_log\.jsonl|checkpoint",
    "distill": r"args\.json|train_log\.jsonl|dev_metrics\.jsonl|checkpoint|alpha\.png|best-epoch\d+",
    "evaluate": r"metrics\.json|summary\.md|significance\.json|sweep\.md|predictions|nbest|"
                r"baseline|fig\d+_[\w.-]+\.png"}
ANY_OWN = re.escape(MARKER) + r"|\.tmp-.*"         # and the temporaries of a run that was killed
MODEL_FILES = (r"(generation_)?config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)|"
               r"(model\.safetensors|pytorch_model\.bin)\.index\.json|tokenizer(_config)?\.json|"
               r"special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|merges\.txt|"
               r"(sentencepiece\.bpe|spiece|tokenizer)\.model|chat_template\.(jinja|json)")


# What the scripts write inside their own subdirectories (paths relative to it): a user's file
# in there is as much theirs as one beside them. checkpoint/'s config and tokenizer files are
# also recorded in the marker as they are written (make_checkpoint_dir).
OWN_INSIDE = {
    "checkpoint": rf"state\.pt(\.tmp)?|{MODEL_FILES}",
    "best-epoch": MODEL_FILES,                                  # best-epoch<N>/
    "predictions": r"[\w.-]+\.json|[\w.-]+/[\w.-]+\.json",       # GROUP.json, GROUP/KEY.json
    "nbest": r"[\w.-]+/[\w.-]+\.json"}


def foreign_entries(path, kind):
    """The entries of `path` (an output of `kind`) that this project did not write, sorted; a
    directory's name ends in "/", a file inside one of the run's own directories is named by its
    path ("checkpoint/notes.txt"). An evaluation kept inside a run (RUN/eval), itself all ours,
    belongs to the run; so does the baseline's evaluation inside an evaluation."""
    ours = re.compile(f"{ANY_OWN}|{OWN_NAMES[kind]}" +
                      ("" if kind == "evaluate" else f"|{MODEL_FILES}"))
    recorded = set(_marker(path).get("files", ()))
    foreign = []
    for name in sorted(os.listdir(path)):
        entry = os.path.join(path, name)
        is_dir = os.path.isdir(entry) and not os.path.islink(entry)
        if is_dir and ours.fullmatch(name) and not re.fullmatch(ANY_OWN, name):
            foreign += foreign_inside(entry, name, kind, recorded)
            continue
        if (ours.fullmatch(name) or name in recorded) and not (is_dir and name == MARKER):
            continue                       # (the marker is a file: a directory so named is not)
        if kind != "evaluate" and is_dir and output_kind(entry) == "evaluate" and \
                not foreign_entries(entry, "evaluate"):
            continue
        foreign.append(name + ("/" if is_dir else ""))
    return foreign


def foreign_inside(directory, name, kind, recorded=()):
    """What in `directory`, the run's own subdirectory `name`, this project did not write."""
    if kind == "evaluate" and name == "baseline":
        return [f"{name}/{x}" for x in foreign_entries(directory, "evaluate")]
    inside = OWN_INSIDE.get(re.sub(r"\d+$", "", name))
    if inside is None:                     # a directory where the script writes a file
        return [name + "/"]
    inside = re.compile(inside)
    foreign = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # not walked into
        for f in sorted(files) + links:
            rel = os.path.relpath(os.path.join(root, f), directory)
            if not (inside.fullmatch(rel) or re.fullmatch(ANY_OWN, f) or f"{name}/{rel}" in recorded):
                foreign.append(f"{name}/{rel}")
    return foreign


def make_checkpoint_dir(out, config, tokenizer):
    """A new run's checkpoint/: the config and tokenizer that --resume rebuilds the model from,
    recorded in the marker as ours (whatever a library version calls its tokenizer's files)."""
    ckpt_dir = os.path.join(out, "checkpoint")
    os.makedirs(ckpt_dir)
    config.save_pretrained(ckpt_dir)
    save_tokenizer(tokenizer, ckpt_dir)
    record_files(out, [f"checkpoint/{name}" for name in os.listdir(ckpt_dir)])


def record_files(directory, names):
    """Add `names` (the model's files, as they are installed) to the marker's record of what
    this run wrote: --overwrite knows them as ours whatever a library version calls them."""
    marker = _marker(directory)
    if marker:
        marker["files"] = sorted(set(marker.get("files", ())) | set(names))
        atomic_write_json(os.path.join(directory, MARKER), marker)


def _inside(path, directory):
    """path is `directory` or lies below it (both absolute, links resolved)."""
    return os.path.commonpath([path, directory]) == directory


def check_output_dir(path, kind, overwrite=False, resume=False, inputs=(), option="--output-dir"):
    """Refuse, with one line, an output directory that cannot be used: a file; one that is or
    holds an input (`inputs`: (option, path) pairs); an existing one without --overwrite or
    --resume; with --overwrite, one that is not an output of this script. An empty directory is
    used as it is. Returns the absolute path."""
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{path}: is a file, not a directory; choose another {option}")
    real = os.path.realpath(out)
    for name, value in inputs:
        if value and os.path.exists(value) and _inside(os.path.realpath(value), real):
            what = "is" if os.path.realpath(value) == real else "holds"
            raise InputError(f"{path}: {option} {what} {name} {value}; writing there would "
                             f"replace it: choose another {option}")
    if not os.path.isdir(out) or resume or not os.listdir(out):
        return out
    found = output_kind(out)
    script = WRITERS[kind]
    if found != kind:
        whose = f"an output of {WRITERS[found]}" if found else "not an output of this project"
        raise InputError(f"{path}: {option} exists and is {whose}; {script} replaces only its "
                         f"own outputs (--overwrite): choose another {option}")
    foreign = foreign_entries(out, kind)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise InputError(f"{path}: {option} is an output of {script} but also holds what this "
                         f"project did not write ({shown}); --overwrite would delete it: move it "
                         f"out first, or choose another {option}")
    if not overwrite:
        hint = "--overwrite to replace it"
        if kind != "evaluate":
            hint += (", or --resume to continue it" if has_checkpoint(out) else
                     " (it has no checkpoint to --resume from)")
        raise InputError(f"{path}: {option} exists (a run of {script}: pass {hint})")
    return out


def state_bytes(model, copies):
    """Bytes of `copies` float32 copies of the model's parameters (weights, teacher, Adam)."""
    return copies * sum(p.numel() for p in model.parameters()) * 4


def on_rank0(check, is_master, world_size):
    """Run `check` (which raises InputError) on rank 0 alone: every rank raises its line, or none."""
    error = None
    if is_master:
        try:
            check()
        except InputError as e:
            error = str(e)
    error = from_rank0(error, world_size)
    if error:
        raise InputError(error)


def check_space(output_dir, model, state_copies, is_master, world_size):
    """Room for what a run writes, known from the model's size: the checkpoint (`state_copies`
    copies of the weights: student, teacher, Adam's two moments) twice while it is replaced, and
    the final model. A checkpoint already there (--resume) holds its share of that already."""
    state = os.path.join(output_dir, "checkpoint", "state.pt")
    there = os.path.getsize(state) if os.path.isfile(state) else 0
    on_rank0(lambda: check_writable(output_dir, state_bytes(model, 2 * state_copies + 1) - there,
                                    "the checkpoint and final model"), is_master, world_size)


def add_output_options(group, script, state_copies):
    """--overwrite, --resume, --save-steps, --keep-checkpoint of a training script."""
    group.add_argument("--overwrite", action="store_true",
                       help=f"replace an earlier {script} run in --output-dir (kept aside until "
                            "this run completes); never anything else")
    group.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    group.add_argument("--save-steps", default="auto",
                       help=f"a mid-epoch checkpoint every N optimiser steps; auto: about every "
                            f"{SAVE_MINUTES} minutes; 0: at epoch ends only")
    group.add_argument("--keep-checkpoint", default="last", choices=("last", "none"),
                       help=f"after the run: keep checkpoint/ (about {state_copies}x the model: "
                            "--resume) or remove it")


def has_checkpoint(out):
    return os.path.isfile(os.path.join(out, "checkpoint", "state.pt"))


def aside_path(out):
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.replaced")


def start_fresh(out, kind):
    """A new run's directory: an --overwrite'n previous output of this script goes aside (kept
    until the new run completes: finish_replacing), then the directory is made with its marker,
    which says whether this run replaces what is aside. Returns the path set aside, or None."""
    aside = aside_path(out)
    moved, replacing = None, False
    if os.path.isdir(out) and os.listdir(out):
        if output_kind(out) != kind or foreign_entries(out, kind):  # check_output_dir refused
            raise InputError(f"{out}: not an output of {WRITERS[kind]} alone; not replaced")
        if os.path.lexists(aside):
            # an earlier --overwrite never finished: what it set aside is the last complete run
            # and stays; the unfinished one here (ours, as just checked) goes. A complete one
            # here as well: which of the two to keep is the user's choice.
            if os.path.isfile(os.path.join(out, "config.json")):
                raise InputError(f"{out}: --overwrite would delete this complete run, as "
                                 f"{aside} holds another kept aside by an earlier --overwrite "
                                 "that never finished: remove one of the two first")
            shutil.rmtree(out)
            replacing = output_kind(aside) == kind
        else:
            os.replace(out, aside)
            moved, replacing = aside, True
    os.makedirs(out, exist_ok=True)
    write_marker(out, kind, replacing=replacing)
    return moved


def finish_replacing(out, display):
    """The new output is complete: the run it replaced, set aside at the start, goes. Only a
    run started with --overwrite (or its --resume) removes it; any other leaves it, saying so."""
    aside = aside_path(out)
    if not os.path.isdir(aside) or not output_kind(aside):
        return
    if _marker(out).get("replacing"):                 # what start_fresh set aside, ours
        shutil.rmtree(aside)
        print(f"replaced the previous run in {display} (kept aside until now)")
    else:
        print(f"note: {aside} holds an earlier run set aside by an --overwrite that never "
              "finished; left as it is")


# -------------------------------------------------------------------- one run per directory
LOCK_TEXT = re.compile(r"pid \d+ on \S+ since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d")   # what a Lock writes


class Lock:
    """An exclusive flock(2) on `path`, which holds "pid N on HOST since TIME" of its holder.

    The kernel drops an flock when its holder dies, so a killed run never blocks the next; the
    file it leaves behind (not empty) tells the next run that one was killed (`on_stale`). The
    holder removes the file before it unlocks; a waiter that had opened the removed file sees that
    the path no longer names it and tries again. One process may take the same path again
    (phase 1 built inside distill.py's process): that is a no-op."""

    held = {}                                   # path -> Lock, in this process

    def __init__(self, path):
        # links resolved: one lock file whatever name reaches it (runs/ a link to scratch space)
        path = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                            os.path.basename(path))
        self.path, self.fd, self.holder, self.waited, self.made_dirs = path, None, "", False, []
        self.reentered = False

    def try_acquire(self):
        key = self.path
        if key in Lock.held:
            self.reentered = True
            return True
        directory = os.path.dirname(self.path) or "."
        while True:
            if not os.path.isdir(directory):  # made here: removed again at release when empty
                missing = directory           # (a failed run), the deepest first
                while not os.path.exists(missing):
                    if missing not in self.made_dirs:     # (again after a race: see below)
                        self.made_dirs.append(missing)
                    missing = os.path.dirname(missing)
                os.makedirs(directory, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:     # another run removed the empty directory just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.holder = os.read(fd, 200).decode(errors="replace").strip()
                self.waited = True
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)                  # locked a file its holder had just removed: again
        previous = os.read(fd, 200).decode(errors="replace").strip()
        if previous and not LOCK_TEXT.fullmatch(previous):    # a file of the user's: untouched
            os.close(fd)
            raise InputError(f"{self.path}: exists and is not a lock file of this project, "
                             "which needs that name for the run's lock: move it")
        if previous:
            self.on_stale(previous, directory)
        since = datetime.datetime.now().isoformat(" ", "seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        self.fd = fd
        Lock.held[key] = self
        return True

    def on_stale(self, previous, directory):
        print(f"note: {self.path} was left by a run that stopped before finishing "
              f"({previous}); taking over", flush=True)
        self.remove_partial_outputs(directory)

    def remove_partial_outputs(self, directory):
        """What the killed run was writing under a temporary name, never to be completed: its
        output beside the lock (common.atomic_output_dir: `.tmp-NAME` and mkdtemp's 8 characters;
        another output's, `.tmp-NAME-v2...`, is left alone) and, inside it, a model it was saving
        (`.tmp-.tmp-final...`, `.tmp-best-epochN...`) or one of its own files (`.tmp-alpha.png...`;
        not an evaluation's into RUN/eval, which has a lock of its own). A --resume or a new run
        writes them again; nothing would ever remove them."""
        name = os.path.basename(self.path)[:-len(".lock")]
        own = "|".join([r"\.tmp-final", re.escape(MARKER), OWN_NAMES["train_qa"],
                        OWN_NAMES["distill"]])
        for where, prefix in ((directory, re.escape(f".tmp-{name}")),
                              (os.path.join(directory, name), rf"\.tmp-({own})")):
            if not os.path.isdir(where):
                continue
            for entry in os.listdir(where):
                path = os.path.join(where, entry)
                if re.fullmatch(prefix + r"[a-z0-9_]{8}", entry):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(path)

    def release(self):
        if self.reentered:
            self.reentered = False
            return
        if self.fd is None:
            return
        Lock.held.pop(self.path, None)
        with contextlib.suppress(OSError):
            os.unlink(self.path)          # before unlocking: see the class docstring
        os.close(self.fd)
        self.fd = None
        for made in self.made_dirs:
            try:
                os.rmdir(made)            # only when empty: a run's output in it stays
            except OSError:
                break
        self.made_dirs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_path(out):
    return out.rstrip(os.sep) + ".lock"


def lock_output_dir(out, display):
    """The run's lock (see Lock), or one line naming the run that holds it."""
    lock = Lock(lock_path(out))
    if not lock.try_acquire():
        raise InputError(f"{display}: in use by another run ({lock.holder or 'starting'}; "
                         f"lock {lock_path(display)}): wait for it, or choose another --output-dir")
    return lock


def claim_output_dir(args, kind, inputs, is_master, world_size, check=None):
    """Rank 0 checks that args.output_dir can be written, takes its lock (one run per directory),
    then checks it (check_output_dir: not an input, not someone else's) and, for --resume, that
    it holds a checkpoint; then `check(out)` (the script's own: same options, ...). One decision
    for every rank. -> (absolute path, links resolved: a link to a directory elsewhere stays a
    link, and its run is locked once whatever name it is given; the lock; other ranks: one with
    nothing to release)."""
    out = os.path.realpath(args.output_dir)
    lock = Lock(lock_path(out))

    def claim():
        nonlocal lock
        check_writable(args.output_dir)
        lock = lock_output_dir(out, args.output_dir)              # then check: no race
        try:
            check_output_dir(args.output_dir, kind, args.overwrite, args.resume, inputs=inputs)
            if args.resume and not has_checkpoint(out):
                raise InputError(f"{args.output_dir}: no checkpoint to resume "
                                 f"({os.path.join(out, 'checkpoint', 'state.pt')} not found); "
                                 "--overwrite starts the run again")
            if check is not None:
                check(out)
        except InputError:
            lock.release()
            raise
    on_rank0(claim, is_master, world_size)
    return out, lock


def read_run_options(path):
    """--resume: the options a run saved (args.json, train_args.json); a file that is not a JSON
    object (damaged) is one line, not a traceback in the comparison."""
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise InputError(f"{path}: damaged, not a run's options (expected a JSON object); "
                         "--overwrite starts the run again")
    return saved


def check_same_options(saved, now):
    """--resume: the options in `now` (RESUME_KEYS of a script) as the checkpoint's run had them."""
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        raise InputError("--resume with options that differ from the checkpoint's run: " +
                         ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {now[k]})"
                                   for k in diff))


# -------------------------------------------------------------------- checkpoints
def rng_state(device):
    """The RNG streams a resume continues: Python's, numpy's, torch's CPU generator and, on a GPU,
    the generator of the run's own `device` (dropout), not every visible GPU's: a run resumed on
    another node, or with other GPUs visible, may have fewer."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state, device):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if device.type != "cuda":
        return                     # a GPU run resumed on a CPU: its CPU streams only
    if isinstance(cuda, list):     # a checkpoint of before 2026-12-05: every visible GPU's state
        index = torch.cuda.current_device() if device.index is None else device.index
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def gather_rng(world_size, device):
    """Every rank's RNG state (rank order), so a resume continues each stream."""
    if world_size == 1:
        return [rng_state(device)]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state(device))
    return states


def from_rank0(obj, world_size):
    """Rank 0's `obj` on every rank (the object itself in a single process)."""
    if world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class Checkpoint:
    """OUTPUT_DIR/checkpoint/state.pt: the models (`models`: {name: module or None}), optimiser,
    scheduler, every rank's RNG state, and where the run stands: epochs done, optimiser steps
    done, steps done in the unfinished epoch (0 at an epoch's end), plus `extra` (e.g. the best
    dev score). Written at every epoch's end and mid-epoch (--save-steps, a stop signal),
    replaced atomically; --resume continues at the next batch of the same data order, to the same
    final weights as an uninterrupted run (bitwise on CPU)."""

    def __init__(self, out, models, optimizer, scheduler, resume_with=None):
        self.out, self.state_path = out, os.path.join(out, "checkpoint", "state.pt")
        self.models, self.optimizer, self.scheduler = models, optimizer, scheduler
        self.device = next(next(m for m in models.values() if m is not None).parameters()).device
        self.resume_with = resume_with or resume_command()   # the command that continues it
        ACTIVE["resume_with"] = self.resume_with if has_checkpoint(out) else None

    def save(self, epochs_done, step, in_epoch, run_options, world_size, is_master, **extra):
        rngs = gather_rng(world_size, self.device)
        if is_master:
            save_state(self.state_path, dict(
                {name: m.state_dict() if m is not None else None for name, m in self.models.items()},
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                rng=rngs, epoch=epochs_done, step=step, in_epoch=in_epoch, world_size=world_size,
                args=run_options, **extra))
            ACTIVE["resume_with"] = self.resume_with
        if world_size > 1:
            torch.distributed.barrier()

    def restore(self, rank, world_size, is_master, run_options=None):
        """Weights, optimiser, schedule and RNG of the last checkpoint -> its state dict (epoch,
        step, in_epoch and the extras). A state.pt of another run (copied in: another script,
        other `run_options`, another model size) is one line, never a run continued from it."""
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise InputError(f"{self.state_path}: cannot be read, it is damaged "
                             f"({str(e).splitlines()[0][:120]}); --overwrite starts the run "
                             "again") from None
        again = "; --overwrite starts the run again"
        needed = [*self.models, "optimizer", "scheduler", "rng", "epoch", "step", "world_size"]
        if not isinstance(state, dict) or any(k not in state for k in needed):
            raise InputError(f"{self.state_path}: not a checkpoint of this script's runs" + again)
        saved = state.get("args")            # the options it was saved with (RESUME_KEYS)
        if run_options is not None and isinstance(saved, dict):
            diff = [k for k in run_options if k in saved and saved[k] != run_options[k]]
            if diff:
                raise InputError(f"{self.state_path}: the checkpoint of another run (" + ", ".join(
                    f"--{k.replace('_', '-')} {saved[k]}, this run's {run_options[k]}"
                    for k in diff) + ")" + again)
        try:
            for name, model in self.models.items():
                if model is not None:
                    model.load_state_dict(state[name])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{self.state_path}: does not fit this run's model "
                             f"({' '.join(str(e).split())[:200]})" + again) from None
        state.setdefault("in_epoch", 0)               # checkpoints written before mid-epoch ones
        if state["world_size"] == world_size:
            set_rng_state(state["rng"][rank], self.device)
        elif is_master:
            print(f"note: checkpoint from {state['world_size']} processes, now {world_size}: "
                  "RNG streams restart (weights will not match an uninterrupted run exactly)")
        return state


def save_state(path, state):
    """torch.save under a temporary name, fsync, then one rename: never a half-written file, and
    a failed write (full disk) leaves the previous checkpoint as it was and no temporary file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
            e = e.__context__            # torch.save's writer reports a full disk as RuntimeError
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise OSError(e.errno, e.strerror, path) from None     # name the file
        raise


def append_row(file, row):
    """One row of a .jsonl log (an open file), flushed; a failed write (full disk) names the file."""
    try:
        file.write(json.dumps(row) + "\n")
        file.flush()
    except OSError as e:
        raise OSError(e.errno, e.strerror, file.name) from None


def read_log(path, keys=()):
    """The rows of a .jsonl log: JSON objects whose `keys` are numbers. A last line cut short (a
    full disk, a kill) is dropped; any other line that is no such row (bytes that are no UTF-8, a
    list, a key missing: the file was damaged, this project appends whole rows) is left out with
    a note, never a traceback in the code that reads the rows."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and all(is_number(row.get(k)) for k in keys):
                rows.append(row)
                continue
        if n < len(lines) or line.endswith("\n"):
            print(f"note: {path}: line {n} is not a row of this log (the file is damaged); "
                  "left out", flush=True)
    return rows


def truncate_log(path, key, last):
    """Keep the rows of a .jsonl log with row[key] <= last (what a checkpoint had seen)."""
    if os.path.exists(path):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                        for r in read_log(path, (key,)) if r[key] <= last))


def remove_checkpoint(out, kind, shown_as):
    """--keep-checkpoint none: the run (of `kind`, named `shown_as` to the user) is complete;
    its checkpoint goes, unless it holds a file this project did not write: then it stays, and
    a note names the file."""
    path, shown = os.path.join(out, "checkpoint"), os.path.join(shown_as, "checkpoint")
    foreign = foreign_inside(path, "checkpoint", kind, set(_marker(out).get("files", ())))
    if foreign:
        print(f"note: {shown} is kept (--keep-checkpoint none): it holds {', '.join(foreign[:3])}"
              f"{' ...' if len(foreign) > 3 else ''}, which this project did not write", flush=True)
        return
    shutil.rmtree(path, ignore_errors=True)
    print(f"removed {shown} (--keep-checkpoint none)", flush=True)


def parse_save_steps(value):
    """--save-steps: 'auto' (a checkpoint about every SAVE_MINUTES minutes), 0 (at epoch ends
    only) or N optimiser steps."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise InputError(f"--save-steps must be 'auto' or a number of steps, got {value}") from None
    if n < 0:
        raise InputError(f"--save-steps must be 0 (epoch ends only) or more, got {n}")
    return n


class SaveClock:
    """When to write a mid-epoch checkpoint: every N steps, or (auto) every SAVE_MINUTES."""

    def __init__(self, save_steps):
        self.save_steps, self.last = save_steps, time.time()

    def due(self, step):
        if self.save_steps == "auto":
            return time.time() - self.last >= SAVE_MINUTES * 60
        return bool(self.save_steps) and step % self.save_steps == 0

    def saved(self):
        self.last = time.time()


# -------------------------------------------------------------------- signals
class StopSignals:
    """While `deferred`, a stop signal is noted, and the training loop ends its optimiser step,
    saves and exits (`requested`); otherwise it raises Stopped at once. A second signal while
    deferred (an impatient Ctrl-C) raises at once too: every write is atomic."""

    def __init__(self):
        self.signum, self.deferring, self.previous = None, False, {}

    def __enter__(self):
        """Install the handlers (main thread only: tests may call main() from another thread);
        the previous ones come back on exit, so a caller in the same process keeps its own."""
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, *exc):
        previous, self.previous = self.previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)
        if exc_type is None and self.signum is not None:   # noted after the loop's last look:
            outer = previous.get(self.signum)              # the run is complete
            if isinstance(getattr(outer, "__self__", None), StopSignals):
                outer(self.signum, None)    # phase 1 inside distill.py's run: that one stops
            elif int(os.environ.get("RANK", 0)) == 0:
                print(f"note: {signal.Signals(self.signum).name} arrived as the run was "
                      "finishing; it completed, nothing to resume", file=sys.stderr, flush=True)

    def _handle(self, signum, frame):
        if self.deferring and self.signum is None:
            self.signum = signum
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield self
        finally:
            self.deferring = False

    @contextlib.contextmanager
    def immediate(self):
        """Within deferred(): a stop signal ends the run at once (work a checkpoint already
        covers, such as scoring a saved epoch); one noted before arrives now."""
        if self.signum is not None:
            raise Stopped(self.signum)
        was, self.deferring = self.deferring, False
        try:
            yield self
        finally:
            self.deferring = was

    def agree(self, save_due, world_size, device):
        """(signal number or 0, save now?) agreed by every rank: a signal reaching one rank stops
        them all at the same step."""
        flags = [float(self.signum or 0), float(save_due)]
        if world_size > 1:
            t = torch.tensor(flags, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flags = t.tolist()
        return int(flags[0]), bool(flags[1])


def resume_hint():
    """For common.run_main: the command that continues this process's run, if it can be."""
    return ACTIVE["resume_with"]


def resume_command():
    """The command that continues this run: this one with --resume (and without --overwrite)."""
    if "RANK" in os.environ:
        return "the same torchrun command with --resume"
    argv = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
    return shlex.join(["python", os.path.basename(sys.argv[0])] + argv + ["--resume"])


def stop_after_save(signum, checkpoint, is_master):
    """The one line after a signal's checkpoint, then exit 128 + signum."""
    if is_master:
        print(f"stopped by {signal.Signals(signum).name}: checkpoint {checkpoint.state_path} "
              f"saved; to continue: {checkpoint.resume_with}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def install_model_files(source, out):
    """Move a saved model's files from `source` into the run directory `out`, config.json last:
    until it lands the directory is not a loadable model, so a crash never leaves a half-written
    one. `source` (ours, inside `out`) is removed."""
    record_files(out, os.listdir(source))
    for name in sorted(os.listdir(source), key=lambda n: n == "config.json"):
        os.replace(os.path.join(source, name), os.path.join(out, name))
    shutil.rmtree(source)


class ProgressLines:
    """A line every PROGRESS_EVERY_S seconds when stderr is not a terminal (nohup, sbatch), where
    tqdm's bar is off: step, loss, windows/s, ETA. `file`: stdout (training's log) or stderr
    (evaluation, whose stdout is its summary)."""

    def __init__(self, enabled, file=None):
        self.enabled = enabled and not sys.stderr.isatty()
        self.last, self.file = 0.0, file

    def maybe(self, text_fn):
        if self.enabled and time.time() - self.last >= PROGRESS_EVERY_S:
            self.last = time.time()
            print(text_fn(), file=self.file or sys.stdout, flush=True)


if __name__ == "__main__":
    not_a_script(__file__)
