"""What `python distill.py --ntl 5 --t 2 --map-k` needs on a fresh machine, fetched and built first.

distill.py calls prepare_inputs(args) before anything else. Only when --model is left at its
default, runs/mbert-qa-en (phase 1's output, train_qa.OUTPUT_DIR):
- runs/mbert-qa-en missing: SQuAD v1.1 is downloaded and verified (data/download.py; files present
  and valid are reused), then phase 1 runs with train_qa.py's own defaults, in this process
  (train_qa.parse_args + train_qa.run), as `python data/download.py squad && python train_qa.py`;
- data/mlqa/MLQA_V1 missing and no --mlqa-dir: MLQA v1 is downloaded for the per-epoch dev scores.
Every download lands by one rename, and the phase-1 model is loadable only once its config.json,
written last, is there, so a run that fails or is killed never leaves a half-written file that a
later run would take as done; a phase 1 that was stopped resumes from its checkpoint. Without internet the run stops
with one line naming what could not be fetched and how to provide it by hand. With --model DIR or
tiny nothing is fetched or built; --no-prepare fails with one line when runs/mbert-qa-en is missing.

Runs started together (a sweep, one process per GPU) take turns through the lock file
runs/mbert-qa-en.lock: the first fetches and builds, the others wait, then find it all built. The
lock is an flock(2), which the kernel drops when its holder dies, so a killed run never blocks the
next one; the file it leaves behind (holding the dead holder's pid, host and start time) tells the
next run that one was killed. flock works across processes of one machine and on NFSv4.

Under torchrun, phase 1 runs on every GPU of the job (DDP, as `torchrun train_qa.py` would): it is
the longest stage of the whole command, too long to leave the other GPUs idle. Rank 0 alone takes
the lock and downloads; the other ranks wait for it in one broadcast per poll, each well inside the
process group's 1-hour timeout, however long another job holds the lock.

    python distill.py --ntl 5 --t 2 --map-k                  # downloads and phase 1 when missing
    python distill.py --ntl 5 --t 2 --map-k --no-prepare     # fail instead, as before
"""
import argparse
import contextlib
import os
import time

import torch

import train_qa
from common import MLQA_DIR, InputError, not_a_script
from rundir import Lock, from_rank0, has_checkpoint, output_kind
from data import download   # data/ is a namespace package: download.py stays a plain script too

PHASE1_DIR = train_qa.OUTPUT_DIR               # = distill.py's default --model
LOCK_FILE = PHASE1_DIR + ".lock"
POLL_S = 2                                     # seconds between two tries of a held lock
# Rough phase-1 duration for the first message. SQuAD v1.1 train is about 89,000 windows of 384
# tokens with stride 128 (88,641 with BERT's English tokenizer). CPU: an mBERT-base training step
# ran at 1.5 windows/s on this project's 2-thread EPYC (8 rows of 180 tokens). GPU: an estimate
# from FLOPs for one A100-class GPU in bf16 (about 100 GFLOP per window), not yet measured.
SQUAD_WINDOWS, GPU_WINDOWS_PER_S, CPU_WINDOWS_PER_S_PER_THREAD = 89_000, 400, 0.75
MANUAL = {  # how to provide a data set by hand, for the error line of a failed download
    "squad": "without internet, put train-v1.1.json and dev-v1.1.json into data/squad/ "
             "(`python data/download.py squad` fetches them), or pass --model DIR (a phase-1 model)",
    "mlqa": "without internet, unpack MLQA_V1.zip into data/mlqa/ (`python data/download.py mlqa` "
            "fetches it), pass --mlqa-dir DIR, or --no-prepare to train without MLQA-dev scores",
}
NAMES = {"squad": "SQuAD v1.1", "mlqa": "MLQA v1"}
WHY = {"squad": "phase 1's training data, 35 MB", "mlqa": "for the per-epoch MLQA-dev scores, 76 MB"}


def add_arguments(parser):
    """distill.py's options for this step."""
    parser.add_argument("--no-prepare", action="store_true",
                        help=f"do not download data or build {PHASE1_DIR} when missing: fail instead")
    parser.add_argument("--data-base-url", default=None, help=argparse.SUPPRESS)  # tests: a local server
    parser.add_argument("--phase1-model", default=None, help=argparse.SUPPRESS)   # tests: tiny


def missing(args):
    """What distill.py's run needs and is not there: 'model' (phase 1), 'mlqa' (dev scores)."""
    need = []
    built = os.path.isfile(os.path.join(PHASE1_DIR, "config.json"))   # written last
    if args.model == PHASE1_DIR and not args.resume and not built:
        need.append("model")              # --resume reads its checkpoint, not the phase-1 model
    if args.model == PHASE1_DIR and args.mlqa_dir is None and not os.path.isdir(MLQA_DIR):
        need.append("mlqa")               # present, even in part: the user's, left as it is
    return need


def prepare_inputs(args):
    """Fetch and build what `missing` names, once across concurrent runs; see the docstring."""
    if args.model != PHASE1_DIR:          # --model DIR or tiny: the user's own model, nothing to do
        return
    _, world_size, device, is_master = train_qa.setup_distributed()
    need = from_rank0(missing(args) if is_master else None, world_size)  # one decision for all ranks
    if not need:
        return
    if args.no_prepare:
        if "model" in need:
            raise InputError(f"{PHASE1_DIR}: not found (--no-prepare); build it with `python "
                             "data/download.py squad && python train_qa.py`, or pass --model DIR")
        return                            # no MLQA: phase 2 runs without dev scores, as before
    phase1_args = train_qa.parse_args(["--output-dir", PHASE1_DIR] +
                                      (["--model", args.phase1_model] if args.phase1_model else []))
    if has_checkpoint(PHASE1_DIR):        # a phase 1 stopped earlier: it goes on where it was
        phase1_args.resume = True
    elif output_kind(PHASE1_DIR) == "train_qa":   # stopped before its first checkpoint: again
        phase1_args.overwrite = True
    with Lock(LOCK_FILE) if is_master else contextlib.nullcontext() as lock:
        wait_for(lock, world_size)
        need = from_rank0(missing(args) if is_master else None, world_size)  # the other run's work counts
        error = None
        if is_master:
            if lock.waited:
                print(f"{PHASE1_DIR}.lock: free again; " +
                      (f"still missing: {', '.join(need)}" if need else "all built, going on"),
                      flush=True)
            if "model" in need:
                print(building(args, phase1_args, device, world_size), flush=True)
            names = (["squad"] if "model" in need else []) + (["mlqa"] if "mlqa" in need else [])
            try:
                for name in names:
                    fetch(name, args.data_base_url)
            except InputError as e:
                error = str(e)
        error = from_rank0(error, world_size)  # a failed download stops every rank, with the same line
        if error:
            raise InputError(error)
        if "model" in need:
            train_qa.run(phase1_args,     # every rank: DDP under torchrun; the master saves
                         resume_with="the same command (phase 1 resumes from its checkpoint)")
            if world_size > 1:
                torch.distributed.barrier()   # the others load it next: wait for the save
            if is_master:
                print(f"{PHASE1_DIR}: built; going on with phase 2", flush=True)


def building(args, phase1_args, device, world_size):
    """The line that says phase 1 is built first; under --as-authors, that it is this project's
    phase 1 all the same (the authors' is a separate model, a row of the README's fidelity table)."""
    line = (f"{PHASE1_DIR} not found: building it first (phase 1, the model phase 2 starts from: "
            f"{phase1_args.model or train_qa.MODEL} on SQuAD v1.1, {phase1_args.epochs} epochs"
            f"{duration(phase1_args, device, world_size)}; --model DIR to use another)")
    if getattr(args, "as_authors", False):
        line += ("; --as-authors sets phase 2's switches, while this phase 1 has train_qa.py's "
                 "defaults: for the authors' phase 1, `python train_qa.py --as-authors --output-dir "
                 f"{PHASE1_DIR}-authors`, then --model {PHASE1_DIR}-authors")
    return line


def fetch(name, base_url=None):
    """data/download.py's download of one data set; its error becomes the line a user needs."""
    print(f"fetching {NAMES[name]}, {WHY[name]} (python data/download.py {name})", flush=True)
    try:
        download.download([name], base_url=base_url)
    except InputError as e:
        raise InputError(f"could not fetch {NAMES[name]}: {e}; {MANUAL[name]}") from None


def duration(phase1_args, device, world_size):
    """'; roughly N minutes on 1 GPU' for mBERT (nothing for another base model)."""
    if (phase1_args.model or train_qa.MODEL) != train_qa.MODEL:
        return ""
    windows = SQUAD_WINDOWS * phase1_args.epochs
    if device.type == "cuda":
        minutes = windows / (GPU_WINDOWS_PER_S * world_size) / 60
        return f"; roughly {max(1, round(minutes))} minutes on {world_size} GPU" + "s" * (world_size > 1)
    threads = torch.get_num_threads()
    hours = windows / (CPU_WINDOWS_PER_S_PER_THREAD * threads) / 3600
    return f"; roughly {round(hours)} hours on this CPU ({threads} threads), minutes on a GPU"


def wait_for(lock, world_size):
    """Rank 0 tries the lock every POLL_S seconds; the other ranks of a torchrun job wait with it."""
    said = False
    while not from_rank0(lock.try_acquire() if lock is not None else None, world_size):
        if lock is not None and not said:
            print(f"{LOCK_FILE}: another run ({lock.holder or 'starting'}) is preparing "
                  f"{PHASE1_DIR} or its data; waiting for it", flush=True)
            said = True
        time.sleep(POLL_S)


if __name__ == "__main__":
    not_a_script(__file__)
