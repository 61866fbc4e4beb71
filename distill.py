"""Phase 2 (paper Sec. 4.2-4.4, 5.2): self-knowledge distillation in generations, with mAP@k.

Continues training mBERT-qa-en (train_qa.py) on cross-lingual samples of XQuAD (Sec. 4.2, Eq. 3).
The teacher has the student's architecture; it starts as the initial model, and at the start of
every epoch after the first it becomes a copy of the student (Sec. 4.3, "generations"). It runs in
eval mode (no dropout), without gradients. Per row (window) of a batch:

    l = a_ce * CE(gold, p) + a_kl * t^2 * KL(p_teacher^t || p_student^t)          # Eq. 4 / Eq. 6

each term averaged over the start and end distributions; every softmax runs over the positions
that may hold an answer (Eq. 1: the context tokens and [CLS]; train_qa.qa_logits masks the rest).
The loss of an optimisation step is the mean over its groups of --alpha-rows rows (default 6) of
the group means of l: the authors' 24-row step is 4 accumulated micro-batches of 6 rows, each
with its own alpha, computed here inside one whole-batch pass.

    flags                a_ce  a_kl                                          paper
    --map-k              1     alpha = mAP@k of the teacher, per row group   skd, mAP@k (Eq. 5, 6)
    (none)               1     1                                             skd (Eq. 4)
    --ce-only            1     -- (no teacher pass at all)                   w/ ce (Table 2)
    --no-ce [--map-k]    0     1 or alpha                                    w/o ce (Table 5)

    python distill.py --ntl 5 --t 2 --map-k                   # -> runs/distill-ntl5-t2-skd-map
    python distill.py --ntl 5 --t 2                           # plain skd
    python distill.py --ntl 3 --ce-only                       # "w/ ce" baseline
    python distill.py --ntl 5 --t 2 --map-k --no-ce           # Table 5 ablation
    python distill.py --ntl 5 --t 2 --map-k --resume          # continue from the last checkpoint
    torchrun --nproc_per_node 4 distill.py --ntl 5 --t 2 --map-k     # DDP, batch 24 = 4 x 6
    python distill.py --ntl 5 --t 2 --map-k --model tiny --max-examples 200   # CPU smoke, ~1 min
    python distill.py --ntl 5 --t 2 --map-k --as-authors      # every switch at the authors' value

The switches between this project's computation and the authors' (README "Fidelity"), each
defaulting to ours: --windows legacy, --softmax-support all, --batches random, --map-k-relevant
authors, --answers legacy (per-epoch dev scores), --precision fp32; --as-authors sets them all.

--max-examples N keeps the first N sampled examples (the sample lists each XQuAD id's (1+ntl)^2
pairs together, so that is about N/(1+ntl)^2 ids with all their pairs).

Output directory (default runs/distill-ntl{ntl}-t{t}-{mode}; -ntl{ntl}-ce for --ce-only; then
-seed{N} for a --seed other than 3):
  config.json, model.safetensors, tokenizer files   the final model, written last: the student
        after the last epoch, as the authors' scripts keep it (--keep-best-epoch: the epoch with
        the best MLQA-dev G-XLT F1 instead); loads with AutoModelForQuestionAnswering/AutoTokenizer
  train_log.jsonl    one row per optimisation step: step, epoch (1-based), lr, loss, ce, kl, alpha
                     (alpha: the mean over the step's row groups)
  alpha.png          alpha over training, epoch boundaries marked (Fig. 4 / Fig. 7), --map-k only
  dev_metrics.jsonl  one row per epoch with MLQA-dev pairs, XLT and G-XLT (when MLQA is present)
  args.json          the run's options (ntl, t, mode, ...), read by evaluate_mlqa.py --sweep
  checkpoint/        config + tokenizer of the run and state.pt: student, teacher, optimiser,
        scheduler, RNG states of every rank, epochs done, step, steps done in the epoch, best dev
        score; replaced atomically at the end of every epoch and mid-epoch (--save-steps, a stop
        signal: rundir.py); removed at the end with --keep-checkpoint none; OUTPUT_DIR.lock
        beside it while the run lives; --resume continues from it (same final weights as
        an uninterrupted run; bitwise on CPU). The data order is a function of (seed, epoch).
  best-epoch{N}/     with --keep-best-epoch: the best student so far (the final model at the end)
"""
import argparse
import contextlib
import glob
import math
import os
import re
import shutil
import time
from typing import NamedTuple

import common  # noqa: F401 (first: OpenMP's wait policy before torch loads it)
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForQuestionAnswering

import prepare
import report
import train_qa
from common import (LANGUAGES, MLQA_DIR, XQUAD_DIR, ArgumentParser, InputError, atomic_write_json,
                    check_seed, parse_with_preset, run_main)
from evaluate_mlqa import (load_gold_examples, mlqa_pair_path, mlqa_task, predict_tasks,
                           score_tasks)
from map_at_k import RELEVANT, VARIANTS, alpha_per_row
from rundir import (Checkpoint, ProgressLines, SaveClock, StopSignals, add_output_options,
                    append_row, aside_path, check_same_options, check_space, claim_output_dir,
                    finish_replacing, foreign_inside, install_model_files, make_checkpoint_dir,
                    parse_save_steps, read_log, read_run_options, remove_checkpoint, resume_hint,
                    start_fresh, stop_after_save, truncate_log)
from sample import sample_cross_lingual
from train_qa import (barrier, build_features, collate, compile_forward, finish,
                      load_model_and_tokenizer, make_optimizer, make_scheduler, optimizer_step,
                      qa_logits, save_model, setup_distributed)

# -------------------------------------------------------------------- defaults (Sec. 5.2, DESIGN)
MODEL = "runs/mbert-qa-en"                 # phase 1's output (train_qa.py)
NTL, T = 5, 2.0                            # target languages per id (Eq. 3), KD temperature
EPOCHS, LR, BATCH_SIZE, SEED = 3, 5e-5, 24, 3   # the authors' scripts (not the paper's 1e-3)
K, DELTA, MAP_VARIANT = 10, 5, "first-hit"  # Eq. 5: top k, window of 2*delta tokens, the score
ALPHA_ROWS = 6                             # rows per alpha: the authors' micro-batch (6 x 4 = 24)
CPU_PASS_ROWS = 12                         # rows per CPU pass: 1.05x (fp32), 1.22x (bf16) the speed of 6
# options that must match for --resume (the rest, e.g. --mlqa-dir, may change)
RESUME_KEYS = ("model", "ntl", "t", "mode", "k", "delta", "map_variant", "alpha_rows", "epochs",
               "lr", "batch_size", "grad_accum", "seed", "max_examples", "max_length", "stride",
               "max_query_length", "weight_decay", "xquad_dir", "keep_best_epoch", "precision",
               "windows", "softmax_support", "batches", "answers", "map_k_relevant", "as_authors")
# the value a run's args.json written before these options existed stands for
RESUME_DEFAULTS = dict(windows="fast", softmax_support="context", batches="grouped", answers="offsets",
                       map_k_relevant="masked", as_authors=False)
# --as-authors: every switch at the authors' value (README "Fidelity") and their phase-2 script
# (train_skd_map.sh: batch 6 x 4 accumulated = 24, 3 epochs, seed 3, lr 5e-5 by default)
AS_AUTHORS = dict(windows="legacy", softmax_support="all", batches="random", answers="legacy",
                  map_k_relevant="authors", precision="fp32", max_query_length=train_qa.MAX_QUERY_LENGTH,
                  max_length=train_qa.MAX_LENGTH, stride=train_qa.STRIDE, epochs=EPOCHS, lr=LR,
                  batch_size=BATCH_SIZE, seed=SEED, k=K, delta=DELTA, map_variant=MAP_VARIANT,
                  alpha_rows=ALPHA_ROWS)


# -------------------------------------------------------------------- the run, as the paper reads
def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device, is_master = setup_distributed()
    if args.mlqa_dir is not None and not os.path.isdir(args.mlqa_dir):
        raise InputError(f"{args.mlqa_dir}: MLQA directory not found (--mlqa-dir)")
    out, lock = claim_output_dir(args, "distill", [("--model", args.model), ("--xquad-dir",
                                 args.xquad_dir), ("--mlqa-dir", args.mlqa_dir)], is_master,
                                 world_size, check=(lambda out: check_resumable(args, out))
                                 if args.resume else None)                  # one run per directory
    with lock, StopSignals() as stop:        # Ctrl-C, SIGTERM, SIGUSR1: see rundir
        distill(args, out, rank, world_size, device, is_master, stop)
    finish()


def distill(args, out, rank, world_size, device, is_master, stop):
    """Phase 2, as the paper reads: the sample, the models, then per epoch and step the teacher's
    soft labels, alpha and the loss; MLQA-dev scores and a checkpoint at every epoch's end."""
    prepare.prepare_inputs(args)         # the default --model missing: fetch data, build phase 1
    train_qa.set_matmul_precision(args.precision, device)   # this stage's own, not phase 1's
    micro = rows_per_pass(args, world_size)
    pad_to = train_qa.pad_length(args.max_length, args.batches, args.softmax_support,
                                 args.map_k_relevant)
    multiple = train_qa.pad_multiple(device, args.precision, args.max_length)
    # Sec. 4.2, Eq. 3: every (question, context) language pair of 1 + ntl languages per XQuAD id
    examples = sample_cross_lingual(args.xquad_dir, args.ntl, args.seed)[:args.max_examples]
    student, tokenizer = load_student(args, examples, out)
    train_qa.check_max_length(args.max_length, student, tokenizer)
    check_space(args.output_dir, student, 3 if args.ce_only else 4, is_master, world_size)
    features = build_features(examples, tokenizer, args.max_length, args.stride,  # windows
                              max_query_length=args.max_query_length, windows=args.windows)
    lengths = np.array([len(x) for x in features["input_ids"]])
    epoch_batches = lambda epoch: train_qa.batch_order(  # noqa: E731 (same order on resume)
        lengths, micro, args.seed, epoch, args.batches, rank=rank, world_size=world_size)
    steps_per_epoch = count_steps(epoch_batches(0), args.grad_accum, len(lengths))
    dev = DevSet(args.mlqa_dir or MLQA_DIR, args, rank, world_size)    # Sec. 5.2; read before
    if args.keep_best_epoch and not dev and is_master:                   # anything is written
        print(f"note: no MLQA dev data ({args.mlqa_dir or MLQA_DIR}): --keep-best-epoch has no "
              "scores to choose by; the final model is the last epoch's", flush=True)
    start_output_dir(out, student, tokenizer, args, is_master, world_size)
    student.to(device).train()
    model = ddp(student, device) if world_size > 1 else student
    teacher = None if args.ce_only else frozen_copy(student)     # generation 0: the initial model
    if args.compile:
        compile_forward(student, teacher)
    optimizer = make_optimizer(student, args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, steps_per_epoch * args.epochs)
    checkpoint = Checkpoint(out, {"student": student, "teacher": teacher}, optimizer, scheduler)
    torch.manual_seed(args.seed + rank)                          # dropout stream, as train_qa
    epoch0, step, skip, best, scored = restore(checkpoint, args, out, rank, world_size, is_master)
    log = RunLog(out, is_master, len(examples), len(lengths), steps_per_epoch, args, device,
                 world_size, dev)
    opts, clock = step_options(args), SaveClock(args.save_steps)
    with stop.deferred():                    # a signal ends the step, saves, exits (rundir)
        if not scored:                       # stopped while scoring the last epoch: again
            best = score_epoch(epoch0 - 1, step, dev, student, tokenizer, device, out, args, best,
                               checkpoint, log, stop, world_size, is_master)
        for epoch in range(epoch0, args.epochs):
            if teacher is not None and epoch > 0 and not skip:
                teacher.load_state_dict(student.state_dict())    # Sec. 4.3: a new generation
            bar = log.epoch_bar(epoch, steps_per_epoch, done=skip)
            for i, step_batches in enumerate(chunks(epoch_batches(epoch), args.grad_accum)):
                if i < skip:                                     # done before the checkpoint
                    continue
                passes = row_passes(step_batches, args.alpha_rows, device)  # one optimiser step
                stats = sum(forward_backward(model, teacher,      # teacher pass, alpha (Eq. 5),
                                             collate(features, idx, tokenizer.pad_token_id, device,
                                                     pad_to, multiple),
                                             opts, share, sync=j + 1 == len(passes))  # loss (Eq. 6)
                            for j, (idx, share) in enumerate(passes))
                loss, ce, kl, alpha = mean_over_ranks(stats, world_size)
                step += 1
                train_qa.check_finite(loss, step, epoch, checkpoint.state_path)
                log.step(bar, step, epoch, scheduler.get_last_lr()[0], loss, ce, kl, alpha,
                         step_batches)
                optimizer_step(student, optimizer, scheduler)    # clip, AdamW, schedule
                signum, save_now = stop.agree(clock.due(step), world_size, device)
                if signum or (save_now and i + 1 < steps_per_epoch):   # mid-epoch checkpoint
                    checkpoint.save(epoch, step, i + 1, run_args(args), world_size, is_master,
                                    best=best)
                    clock.saved()
                if signum:
                    bar.close()
                    log.close()
                    stop_after_save(signum, checkpoint, is_master)
            skip = 0
            bar.close()
            # end of epoch: the checkpoint every rank contributes to, then the MLQA-dev scores
            checkpoint.save(epoch + 1, step, 0, run_args(args), world_size, is_master, best=best,
                            scored=not dev)
            clock.saved()
            best = score_epoch(epoch, step, dev, student, tokenizer, device, out, args, best,
                               checkpoint, log, stop, world_size, is_master)
            if stop_early(args, epoch, is_master):
                break
        else:
            if is_master:
                install_final_model(out, args, student, tokenizer, best, log)
    log.close()
    del model                                  # DDP's reducer goes before its process group


# -------------------------------------------------------------------- one micro-batch (Eq. 4-6)
class StepOptions(NamedTuple):
    """The flags and Eq. 4-6 hyper-parameters a training step needs."""
    map_k: bool = True                    # a_kl = alpha (Eq. 6) instead of 1 (Eq. 4)
    no_ce: bool = False                   # a_ce = 0 (Table 5 ablation)
    t: float = T
    k: int = K
    delta: int = DELTA
    map_variant: str = MAP_VARIANT
    alpha_rows: int = ALPHA_ROWS
    precision: str = "auto"
    softmax_support: str = "context"      # "all": every position of the padded window (authors')
    map_k_relevant: str = "masked"        # "authors": their mAP@k ranking and relevant positions


def step_options(args):
    return StepOptions(args.map_k, args.no_ce, args.t, args.k, args.delta, args.map_variant,
                       args.alpha_rows, args.precision, args.softmax_support, args.map_k_relevant)


# the loss and alpha code, named for bench.py --profile (about a microsecond without a profiler)
LOSS_REGION = lambda: torch.profiler.record_function("loss + mAP@k")  # noqa: E731


def forward_backward(model, teacher, batch, opts, scale=1.0, sync=True):
    """Sec. 4.3-4.4 on one micro-batch: the teacher's soft labels, alpha of Eq. 5 from them,
    the student's logits, the loss of Eq. 4 / Eq. 6, backward of scale * loss. teacher None:
    cross-entropy only ("w/ ce"). sync False: no DDP gradient all-reduce yet (accumulating).
    opts.softmax_support "all": CE, KL and the soft labels over every position of the batch's
    windows (pad them to --max-length as the authors: train_qa.pad_length); opts.map_k_relevant
    "authors": alpha from the teacher's unmasked logits, ranked over all positions.
    Returns the detached [loss, ce, kl, alpha] x scale (no host sync)."""
    gold = batch["start_positions"], batch["end_positions"]
    t_start = t_end = None
    a_kl = torch.ones(len(gold[0]), device=gold[0].device)
    if teacher is not None:
        raw = opts.map_k and opts.map_k_relevant == "authors"                 # unmasked for alpha
        with torch.no_grad():
            t_start, t_end = qa_logits(teacher, batch, opts.precision,       # soft labels
                                       "all" if raw else opts.softmax_support)
        if opts.map_k:                                                        # Eq. 5, per group
            with LOSS_REGION():
                a_kl = alpha_per_row(t_start, t_end, *gold, opts.alpha_rows, opts.k, opts.delta,
                                     opts.map_variant, mask=batch["allowed"],
                                     relevant=opts.map_k_relevant)
        if raw and opts.softmax_support == "context":                         # Eq. 1 for the KL
            t_start, t_end = (x.masked_fill(~batch["allowed"], train_qa.MASK_VALUE)
                              for x in (t_start, t_end))
    with contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
        s_start, s_end = qa_logits(model, batch, opts.precision, opts.softmax_support)  # Eq. 1
        with LOSS_REGION():
            loss, ce, kl = distill_loss(s_start, s_end, *gold, t_start, t_end, opts.t,
                                        a_ce=0.0 if opts.no_ce else 1.0, a_kl=a_kl,
                                        group_rows=opts.alpha_rows)           # Eq. 4 / Eq. 6
        (loss * scale).backward()
    alpha = (group_weights(len(a_kl), opts.alpha_rows, a_kl.device) * a_kl).sum()
    kl = torch.zeros_like(ce) if kl is None else kl
    return torch.stack([loss.detach(), ce.detach(), kl.detach(), alpha]) * scale


def kl_rows(student_logits, teacher_logits, t):
    """t^2 * KL(p_teacher^t || p_student^t) of each row (Eq. 4, Hinton et al.'s t^2). Both logits
    come Eq. 1-masked from qa_logits: a masked position has probability 0 on both sides."""
    # float64: at a large t both distributions are near uniform and float32's rounding of their
    # log-probabilities, times t^2, swamps the KL (t=1e4 gave 5.7 for ~0.003; t=1e6 a negative KL)
    log_p_student = F.log_softmax(student_logits.double() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.double() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1) * t * t
    return kl.float()


def group_weights(n_rows, group_rows, device):
    """Row weights w such that sum(w * x) is the mean over groups of `group_rows` consecutive rows
    (the last group may be shorter) of the group means of x."""
    group = torch.arange(n_rows, device=device) // group_rows
    sizes = torch.bincount(group)
    return 1.0 / (len(sizes) * sizes[group])


def distill_loss(start_logits, end_logits, start_positions, end_positions, teacher_start=None,
                 teacher_end=None, t=T, a_ce=1.0, a_kl=1.0, group_rows=None):
    """Eq. 4 / Eq. 6 -> (loss, ce, kl), each the mean over row groups of the group means.

    Logits come from qa_logits (Eq. 1 applied). CE: Eq. 2, (CE_start + CE_end) / 2 per row at
    t = 1. KL: (KL_start + KL_end) / 2 per row at temperature t, x t^2. a_kl: a number or one
    weight per row (alpha of the row's group, Eq. 5). kl is None without teacher logits.
    group_rows None: the whole batch is one group (a plain mean over rows).
    """
    w = group_weights(len(start_positions), group_rows or len(start_positions), start_logits.device)
    ce = (F.cross_entropy(start_logits, start_positions, reduction="none") +
          F.cross_entropy(end_logits, end_positions, reduction="none")) / 2           # Eq. 2
    if teacher_start is None:
        return a_ce * (w * ce).sum(), (w * ce).sum(), None
    kl = (kl_rows(start_logits, teacher_start, t) + kl_rows(end_logits, teacher_end, t)) / 2
    rows = a_kl * kl if a_ce == 0 else a_ce * ce + a_kl * kl                          # Eq. 4 / 6
    return (w * rows).sum(), (w * ce).sum(), (w * kl).sum()


# -------------------------------------------------------------------- batching helpers
def rows_per_pass(args, world_size):
    """Rows of one micro-batch per process; alpha groups must tile it."""
    micro = train_qa.micro_batch(args.batch_size, world_size, args.grad_accum)
    if micro > args.alpha_rows and micro % args.alpha_rows:
        raise InputError(f"--alpha-rows {args.alpha_rows} does not divide the {micro} rows of a "
                         "micro-batch (--batch-size / (world size x --grad-accum))")
    if args.alpha_rows > micro and micro < args.batch_size and not getattr(args, "alpha_rows_given", True):
        if int(os.environ.get("RANK", 0)) == 0:      # the default, not asked for: said plainly
            print(f"note: alpha is per {micro} rows, a micro-batch (--batch-size {args.batch_size} / "
                  f"(world size {world_size} x --grad-accum {args.grad_accum})), not per "
                  f"--alpha-rows {args.alpha_rows}")
    elif args.alpha_rows > micro and micro < args.batch_size:   # alpha would be per micro rows
        raise InputError(f"--alpha-rows {args.alpha_rows} is more than the {micro} rows of a "
                         f"micro-batch (--batch-size {args.batch_size} / (world size {world_size} x "
                         f"--grad-accum {args.grad_accum})): pass --alpha-rows {micro} (or fewer "
                         "processes, a smaller --grad-accum or a larger --batch-size)")
    return micro


def count_steps(batches, grad_accum, n_windows):
    if not batches:
        raise InputError(f"{n_windows} training windows are fewer than one batch per process "
                         "(--batch-size, --max-examples)")
    return math.ceil(len(batches) / grad_accum)


def chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]


def row_passes(step_batches, alpha_rows, device):
    """The model passes of one optimiser step: (row indices, share of the step's row groups).
    A GPU takes each micro-batch whole; a CPU cuts it into passes of whole alpha groups of about
    CPU_PASS_ROWS rows (cache-friendlier; the same loss and gradient, since every group keeps its
    own alpha and the step's loss is the mean over groups)."""
    cut = None if torch.device(device).type == "cuda" else \
        alpha_rows * max(1, CPU_PASS_ROWS // alpha_rows)
    passes = [idx[lo:lo + (cut or len(idx))] for idx in step_batches
              for lo in range(0, len(idx), cut or len(idx))]
    groups = [math.ceil(len(idx) / alpha_rows) for idx in passes]
    return [(idx, g / sum(groups)) for idx, g in zip(passes, groups)]


def frozen_copy(model):
    """The teacher: same architecture and weights, eval mode, no gradients (Sec. 4.3)."""
    teacher = AutoModelForQuestionAnswering.from_config(model.config, attn_implementation="sdpa")
    teacher = teacher.to(model.device)
    teacher.load_state_dict(model.state_dict())
    return teacher.eval().requires_grad_(False)


def ddp(model, device):
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_ranks(stats, world_size):
    """[loss, ce, kl, alpha] of the step, averaged over the DDP processes -> Python floats."""
    if world_size > 1:
        torch.distributed.all_reduce(stats)
        stats = stats / world_size
    return stats.tolist()


# -------------------------------------------------------------------- MLQA dev (Sec. 5.2)
def load_mlqa_dev(mlqa_dir):
    """{"q-c": examples} for the dev files present in `mlqa_dir`/dev."""
    sets = {}
    for q in LANGUAGES:
        for c in LANGUAGES:
            path = mlqa_pair_path(mlqa_dir, "dev", q, c)
            if os.path.isfile(path):
                sets[f"{q}-{c}"] = load_gold_examples(path)
    if not sets:
        raise InputError(f"{mlqa_dir}: no MLQA dev files (dev/dev-context-C-question-Q.json)")
    return sets


def evaluate_dev(model, tokenizer, dev_sets, device, feature_cache=None, precision="auto",
                 max_query_length=train_qa.MAX_QUERY_LENGTH, windows="fast", answers="offsets",
                 rank=0, world_size=1):
    """MLQA-dev F1/EM per (question, context) pair, XLT (q == c) and G-XLT (all pairs) means, and
    per-context-language means: evaluate_mlqa.py's prediction and scoring of MLQA pairs.
    feature_cache: a dict kept across epochs, so MLQA dev is tokenised once per run. Under DDP
    each rank predicts the pairs of its share of the context languages (a context's questions in
    all languages together: tokenised once) and rank 0 scores them all; the others get None."""
    mine = {key: examples for key, examples in dev_sets.items()
            if LANGUAGES.index(key.split("-")[1]) % world_size == rank}
    tasks = [mlqa_task("dev", *key.split("-"), path=key, examples=examples)
             for key, examples in mine.items()]
    predict_tasks(model, tokenizer, tasks, device=device, desc="MLQA dev",
                  feature_cache=feature_cache, precision=precision,
                  max_query_length=max_query_length, windows=windows, answers=answers,
                  progress_lines=rank == 0)
    predictions = {task["key"]: task["predictions"] for task in tasks}
    if world_size > 1:
        parts = [None] * world_size if rank == 0 else None
        torch.distributed.gather_object(predictions, parts, dst=0)
        if rank != 0:
            return None
        predictions = {key: p for part in parts for key, p in part.items()}
    tasks = [dict(mlqa_task("dev", *key.split("-"), path=key, examples=examples),
                  predictions=predictions[key]) for key, examples in dev_sets.items()]
    return score_tasks(tasks)["mlqa-dev"]


def pairs_present(n):
    """How many MLQA-dev pairs the scores average: fewer than 49 is not Table 2's G-XLT."""
    return f"{n} pairs" if n == len(LANGUAGES) ** 2 else \
        f"{n} of the {len(LANGUAGES) ** 2} pairs (means over those)"


class DevSet:
    """The per-epoch MLQA-dev evaluation: the pairs present under mlqa_dir (none: skipped),
    tokenised once at the first evaluation, shared by the DDP ranks (evaluate_dev)."""

    def __init__(self, mlqa_dir, args, rank=0, world_size=1):
        self.sets = load_mlqa_dev(mlqa_dir) if os.path.isdir(mlqa_dir) else None
        self.features = {}
        self.options = dict(precision=args.precision, max_query_length=args.max_query_length,
                            windows=args.windows, answers=args.answers, rank=rank,
                            world_size=world_size)

    def __bool__(self):
        return self.sets is not None

    def score(self, model, tokenizer, device):
        return evaluate_dev(model, tokenizer, self.sets, device, self.features, **self.options)


def selection_score(metrics):
    """The configuration selection of Sec. 5.2: G-XLT F1 (XLT F1 when no pair is present)."""
    return metrics["gxlt"]["f1"] if metrics["gxlt"]["f1"] is not None else metrics["xlt"]["f1"]


# -------------------------------------------------------------------- run management
def run_args(args):
    return {key: getattr(args, key) for key in RESUME_KEYS}


def check_resumable(args, out):
    """--resume: the checkpoint's run had the same options (RESUME_KEYS)."""
    saved = read_run_options(os.path.join(out, "args.json"))
    check_same_options({k: saved.get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_KEYS},  # older
                       run_args(args))                                               # args.json


def load_student(args, examples, out):
    """The model phase 2 starts from (every rank loads it alike; DDP broadcasts rank 0's
    weights), or on --resume the run's own config and tokenizer (weights: Checkpoint.restore)."""
    if args.resume:
        return train_qa.load_checkpoint_model(out)
    texts = [x for ex in examples for x in (ex["question"], ex["context"])]   # for --model tiny
    return load_model_and_tokenizer(args.model, texts=texts, seed=args.seed, require_qa_head=True)


def start_output_dir(out, student, tokenizer, args, is_master, world_size):
    """A new run's output directory (rank 0): a previous run there (--overwrite) set aside until
    this one completes, then the run's options, config and tokenizer."""
    barrier(world_size)
    if is_master and not args.resume:
        if start_fresh(out, "distill"):
            print(f"--overwrite: the previous run in {args.output_dir} is kept aside as "
                  f"{os.path.basename(aside_path(out))} until this one completes", flush=True)
        make_checkpoint_dir(out, student.config, tokenizer)
        atomic_write_json(os.path.join(out, "args.json"), run_args(args), indent=1)
    barrier(world_size)


def restore(checkpoint, args, out, rank, world_size, is_master):
    """--resume: the checkpoint's weights, optimiser, schedule and RNG -> (epochs done, step,
    steps done in the unfinished epoch, best dev score, whether the last epoch's dev scores are
    in); the log rows written after it are dropped. A new run: (0, 0, 0, None, True)."""
    if not args.resume:
        return 0, 0, 0, None, True
    state = checkpoint.restore(rank, world_size, is_master, run_args(args))
    scored = state.get("scored", True)       # False: stopped while scoring its epoch
    if is_master:  # forget what the interrupted run wrote after the checkpoint
        truncate_log(os.path.join(out, "train_log.jsonl"), "step", state["step"])
        truncate_log(os.path.join(out, "dev_metrics.jsonl"), "epoch", state["epoch"] - (not scored))
        remove_stale_best(out, state["best"])
    return state["epoch"], state["step"], state["in_epoch"], state["best"], scored


class RunLog:
    """What rank 0 tells the user and writes down: a start line, a progress bar per epoch (loss,
    alpha, windows/s, ETA), train_log.jsonl, dev_metrics.jsonl and a line per epoch."""

    def __init__(self, out, is_master, n_examples, n_windows, steps_per_epoch, args, device,
                 world_size, dev):
        self.out, self.is_master, self.epochs = out, is_master, args.epochs
        self.teacher, self.world_size = not args.ce_only, world_size
        self.file = open(os.path.join(out, "train_log.jsonl"), "a", encoding="utf-8") \
            if is_master else None
        self.lines = ProgressLines(is_master)       # the bar's content when stderr is no terminal
        self.t0 = time.time()                        # (an epoch's bar starts it again)
        rows = read_log(os.path.join(out, "train_log.jsonl"), ("loss",)) if is_master else []
        self.loss = rows[-1]["loss"] if rows else None   # the last step's (--resume: from the log)
        if is_master:
            print(f"{n_examples} examples (ntl={args.ntl}) -> {n_windows} windows; mode "
                  f"{args.mode}; {steps_per_epoch} steps/epoch x {args.epochs}; device {device} x "
                  f"{world_size}; MLQA dev: " +
                  (pairs_present(len(dev.sets)) if dev else "none") +
                  ("; resuming" if args.resume else ""), flush=True)

    def epoch_bar(self, epoch, steps, done=0):
        self.t0, self.windows, self.done, self.n = time.time(), 0, done, done
        return tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{self.epochs}",
                    unit="step", disable=None if self.is_master else True, leave=False)

    def step(self, bar, step, epoch, lr, loss, ce, kl, alpha, step_batches):
        self.windows += sum(len(idx) for idx in step_batches) * self.world_size
        self.loss = loss
        kl, alpha = (kl, alpha) if self.teacher else (None, None)      # "w/ ce": no teacher
        if self.is_master:
            append_row(self.file, {"step": step, "epoch": epoch + 1, "lr": lr, "loss": loss,
                                   "ce": ce, "kl": kl, "alpha": alpha})
        bar.update(1)
        self.n += 1                                  # bar.n stays 0 when the bar is off
        elapsed = time.time() - self.t0
        speed = self.windows / elapsed
        bar.set_postfix(loss=f"{loss:.4f}", alpha="-" if alpha is None else f"{alpha:.3f}",
                        windows_per_s=f"{speed:.1f}", refresh=False)
        left = (bar.total - self.n) * elapsed / (self.n - self.done)
        self.lines.maybe(lambda: f"epoch {epoch + 1}/{self.epochs} step {self.n}/{bar.total}: "
                                 f"loss {loss:.4f}" + ("" if alpha is None else f", alpha {alpha:.3f}")
                                 + f", {speed:.1f} windows/s, epoch ETA {left / 60:.1f} min")

    def epoch_done(self, epoch, step, metrics):
        """The epoch's line (its last step's loss: a run resumed after the epoch's last step but
        before its end has run no step of it) and its dev scores."""
        if not self.is_master:
            return
        if metrics is not None:
            with open(os.path.join(self.out, "dev_metrics.jsonl"), "a", encoding="utf-8") as f:
                append_row(f, {"epoch": epoch + 1, "xlt": metrics["xlt"], "gxlt": metrics["gxlt"],
                               "pairs": metrics["pairs"]})
        loss = "-" if self.loss is None else f"{self.loss:.4f}"    # -: no row of it in the log
        msg = f"epoch {epoch + 1}/{self.epochs}: step {step}, loss {loss}, " \
              f"{time.time() - self.t0:.1f}s"                      # (removed or damaged)
        if metrics is not None:
            msg += f"; MLQA dev G-XLT F1 {metrics['gxlt']['f1']:.2f}, XLT F1 " \
                   f"{metrics['xlt']['f1']:.2f}"
        print(msg, flush=True)

    def close(self):
        if self.file and not self.file.closed:
            self.file.close()


def score_epoch(epoch, step, dev, student, tokenizer, device, out, args, best, checkpoint, log,
                stop, world_size, is_master):
    """An epoch's end, its checkpoint written: the MLQA-dev scores (Sec. 5.2; every rank predicts
    a share, rank 0 scores), --keep-best-epoch (a second checkpoint names the best) and the
    epoch's line. A stop signal while they run ends the run at once: --resume scores the epoch
    again from the checkpoint, the same weights. Returns the best so far."""
    with stop.immediate():
        metrics = dev.score(student, tokenizer, device) if dev else None
        if args.keep_best_epoch and dev:
            best = keep_best(out, args, epoch, metrics, best, student, tokenizer) if is_master \
                else best
            checkpoint.save(epoch + 1, step, 0, run_args(args), world_size, is_master, best=best)
            if is_master:
                remove_stale_best(out, best)
    log.epoch_done(epoch, step, metrics)
    return best


def keep_best(out, args, epoch, metrics, best, student, tokenizer):
    """--keep-best-epoch: save the student as best-epoch{N}/ when its MLQA-dev selection score
    beats the best so far. Returns the best so far ({"score", "epoch"} or None)."""
    if not args.keep_best_epoch or metrics is None:
        return best
    score = selection_score(metrics)
    if best is None or score > best["score"]:
        best = {"score": score, "epoch": epoch + 1}
        save_model(student, tokenizer, best_dir(out, best), overwrite=True)
    return best


def best_dir(out, best):
    return os.path.join(out, f"best-epoch{best['epoch']}")


def remove_stale_best(out, best):
    """Keep only the best-epoch* directory the checkpoint names (a crash between saving a new
    best and the checkpoint that records it leaves one behind)."""
    keep = best_dir(out, best) if best else None
    for path in glob.glob(os.path.join(out, "best-epoch*")):
        name = os.path.basename(path)
        if path == keep or not re.fullmatch(r"best-epoch\d+", name):      # ours only
            continue
        if foreign_inside(path, name, "distill"):                          # a file of the user's
            print(f"note: {path} is not removed: it holds files this project did not write")
        else:
            shutil.rmtree(path, ignore_errors=True)


def stop_early(args, epoch, is_master):
    """--stop-after-epoch (tests of --resume): stop as if interrupted after this epoch."""
    if args.stop_after_epoch is None or not args.stop_after_epoch <= epoch + 1 < args.epochs:
        return False
    if is_master:
        print(f"stopped after epoch {epoch + 1} (--stop-after-epoch); --resume continues")
    return True


def install_final_model(out, args, student, tokenizer, best, log):
    """Fig. 4 from the log, then the final model's files into the output directory, config.json
    last (before it lands the directory is not a loadable model, so a crash never leaves a
    half-written one), its MLQA-dev scores and the command that evaluates it for every table."""
    log.close()
    rows = read_log(os.path.join(out, "train_log.jsonl"), ("step", "epoch"))
    if args.map_k and report.alpha_figure(rows, os.path.join(out, "alpha.png")):  # else a_kl = 1
        print(f"wrote {os.path.join(args.output_dir, 'alpha.png')}")
    if best is not None and os.path.isdir(best_dir(out, best)):
        print(f"final model: the best on MLQA dev (epoch {best['epoch']}, G-XLT F1 "
              f"{best['score']:.2f}; --keep-best-epoch)")
        source = best_dir(out, best)
    else:
        source = os.path.join(out, ".tmp-final")
        shutil.rmtree(source, ignore_errors=True)
        save_model(student, tokenizer, source)
    install_model_files(source, out)
    print(f"saved {args.output_dir}")
    finish_replacing(out, args.output_dir)
    if args.keep_checkpoint == "none":
        remove_checkpoint(out, "distill", args.output_dir)
    final_epoch = best["epoch"] if best is not None else args.epochs
    dev = [r for r in read_log(os.path.join(out, "dev_metrics.jsonl"), ("epoch",))
           if r["epoch"] == final_epoch]
    if dev:
        g, x = dev[-1]["gxlt"], dev[-1]["xlt"]
        print(f"MLQA dev, final model (epoch {final_epoch}): G-XLT F1 {g['f1']:.2f} / EM "
              f"{g['exact_match']:.2f}, XLT F1 {x['f1']:.2f} / EM {x['exact_match']:.2f}"
              f"; {pairs_present(len(dev[-1]['pairs']))}")
    baseline = f" --baseline {args.model}" if os.path.isdir(args.model) else ""
    print(f"every table and figure for it: python evaluate_mlqa.py --model {args.output_dir} "
          f"--output-dir {os.path.join(args.output_dir, 'eval')}{baseline}")


# -------------------------------------------------------------------- command line
def mode_name(args):
    """The run's name for directories and logs: ce, skd, skd-map, with -noce for --no-ce."""
    if args.ce_only:
        return "ce"
    return ("skd-map" if args.map_k else "skd") + ("-noce" if args.no_ce else "")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0], epilog=OUTPUT_NAME_RULE)
    m = p.add_argument_group("method (Sec. 4.2-4.4, Eq. 3-6)")
    m.add_argument("--model", default=MODEL, help="phase-1 model directory, hub name, 'tiny' or "
                                                  "'tiny-xlmr' (random small models, offline)")
    m.add_argument("--ntl", type=int, default=NTL, help="target languages per XQuAD id, 0..6 (Eq. 3)")
    m.add_argument("--t", type=float, default=T, help="distillation temperature, > 0")
    m.add_argument("--map-k", action="store_true", help="a_kl = mAP@k of the teacher (Eq. 5, 6)")
    m.add_argument("--no-ce", action="store_true", help="a_ce = 0: KL only (Table 5 ablation)")
    m.add_argument("--ce-only", action="store_true", help="cross-entropy only, no teacher ('w/ ce')")
    m.add_argument("--k", type=int, default=K, help="top-k of Eq. 5")
    m.add_argument("--delta", type=int, default=DELTA, help="window half-width of Eq. 5")
    m.add_argument("--map-variant", default=MAP_VARIANT, choices=VARIANTS,
                   help="first-hit (the authors' score) or eq5 (Eq. 5 as printed)")
    m.add_argument("--alpha-rows", type=int, default=None,
                   help=f"rows per alpha (default {ALPHA_ROWS}, the authors' 6-row micro-batches); "
                        ">= --batch-size: one alpha per batch; more than a micro-batch holds: refused")
    t = p.add_argument_group("training (Sec. 5.2; the authors' scripts)")
    t.add_argument("--epochs", type=int, default=EPOCHS)
    t.add_argument("--lr", type=float, default=LR)
    t.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="effective batch per step")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--weight-decay", type=float, default=train_qa.WEIGHT_DECAY)
    t.add_argument("--seed", type=int, default=SEED)
    t.add_argument("--max-examples", type=int, default=None, help="keep the first N sampled examples")
    t.add_argument("--max-length", type=int, default=train_qa.MAX_LENGTH)
    t.add_argument("--stride", type=int, default=train_qa.STRIDE)
    t.add_argument("--max-query-length", type=int, default=train_qa.MAX_QUERY_LENGTH,
                   help="question tokens kept (the authors' 64); longer questions are cut")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the student's and teacher's forward (needs a C compiler on "
                        "a CPU; the first step compiles, about a minute); off by default")
    t.add_argument("--precision", default="auto", choices=train_qa.PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on a CPU; fp32: true fp32 matmuls; "
                        "tf32: TF32 matmuls on Ampere+")
    f = p.add_argument_group("the authors' computation (README: fidelity notes)")
    f.add_argument("--windows", choices=train_qa.WINDOWS, default="fast",
                   help="legacy: a window starts every --stride tokens (the authors' processor)")
    f.add_argument("--softmax-support", choices=train_qa.SOFTMAX_SUPPORTS, default="context",
                   help="all: CE, KL and soft labels over every position of a window padded to "
                        "--max-length (authors')")
    f.add_argument("--batches", choices=train_qa.BATCHES, default="grouped",
                   help="random: seeded random batches padded to --max-length (authors')")
    f.add_argument("--map-k-relevant", choices=RELEVANT, default="masked",
                   help="authors: mAP@k ranks every position and counts question tokens near "
                        "[CLS] as hits (their code)")
    f.add_argument("--answers", choices=train_qa.ANSWERS, default="offsets",
                   help="per-epoch MLQA-dev answers; legacy: the authors' post-processing")
    f.add_argument("--as-authors", action="store_true",
                   help="every switch at the authors' value and their phase-2 settings; options "
                        "given explicitly win")
    d = p.add_argument_group("data and model selection")
    d.add_argument("--xquad-dir", default=XQUAD_DIR)
    d.add_argument("--mlqa-dir", default=None, help=f"MLQA v1 for the per-epoch dev scores "
                                                    f"(default {MLQA_DIR} when present)")
    d.add_argument("--keep-best-epoch", action="store_true",
                   help="final model = the epoch with the best MLQA-dev G-XLT F1 (default: the last)")
    prepare.add_arguments(d)                 # --no-prepare (and test-only overrides)
    o = p.add_argument_group("output, checkpoints, resuming")
    o.add_argument("--output-dir", default=None, help="default: the name rule below the options")
    add_output_options(o, "distill.py", 4)     # --overwrite --resume --save-steps --keep-checkpoint
    o.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)  # tests
    args = parse_with_preset(p, argv, AS_AUTHORS)

    args.alpha_rows_given = args.alpha_rows is not None   # a default too large for a micro-batch:
    if args.alpha_rows is None:                           # a note (rows_per_pass), not an error
        args.alpha_rows = ALPHA_ROWS
    if not 0 <= args.ntl <= len(LANGUAGES) - 1:
        raise InputError(f"--ntl must be in 0..{len(LANGUAGES) - 1}, got {args.ntl}")
    if not (math.isfinite(args.t) and args.t > 0):
        raise InputError(f"--t must be a positive number, got {args.t}")
    for name in ("k", "delta", "alpha_rows", "epochs", "batch_size", "grad_accum", "max_length",
                 "max_query_length"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise InputError(f"--weight-decay must be 0 or a positive number, got {args.weight_decay}")
    if not 0 < args.stride < args.max_length:
        raise InputError("--stride must be between 0 and --max-length")
    if args.max_examples is not None and args.max_examples < 1:
        raise InputError("--max-examples must be at least 1")
    check_seed(args.seed)
    if args.ce_only and (args.map_k or args.no_ce):
        raise InputError("--ce-only cannot be combined with --map-k or --no-ce")
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    args.save_steps = parse_save_steps(args.save_steps)
    args.mode = mode_name(args)
    if args.output_dir is None:
        tag = "ce" if args.ce_only else f"t{args.t:g}-{args.mode}"
        seed = "" if args.seed == SEED else f"-seed{args.seed}"    # seed runs side by side
        args.output_dir = os.path.join("runs", f"distill-ntl{args.ntl}-{tag}{seed}")
    return args


OUTPUT_NAME_RULE = f"""\
Default --output-dir: runs/distill-ntl{{ntl}}-t{{t}}-{{mode}} (mode: skd-map, skd, with -noce
for --no-ce), runs/distill-ntl{{ntl}}-ce for --ce-only; then -seed{{N}} for a --seed other than {SEED}.
Exit status: 0 done, 2 bad input, an unwritable output or out of memory, 3 a non-finite loss,
130/143/138 stopped by SIGINT/SIGTERM/SIGUSR1 (during training: the checkpoint is saved first)."""


def cli():
    run_main(main, resume_hint, train_qa.MEMORY_HINT)


if __name__ == "__main__":
    cli()
