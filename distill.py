"""Phase 2 (paper Sec. 4.2-4.4, 5.2): self-knowledge distillation in generations, with mAP@k.

Continues training mBERT-qa-en (train_qa.py) on cross-lingual samples of XQuAD (Sec. 4.2, Eq. 3).
The teacher has the student's architecture; it starts as the initial model and at the start of
every epoch after the first it is replaced by the student (Sec. 4.3, "generations"). It runs in
eval mode (no dropout) without gradients. Per forward batch:

    L = a_ce * CE(gold, p) + a_kl * t^2 * KL(p_teacher^t || p_student^t)          # Eq. 4 / Eq. 6

each term averaged over the start and end distributions; every softmax runs over the positions
that may hold an answer, the context tokens and [CLS] (Eq. 1); the KL uses temperature t on both
sides and batch-mean reduction (Hinton et al.); CE is train_qa.ce_loss (Eq. 2, t = 1).

    flags                a_ce  a_kl                                  paper
    --map-k              1     alpha = mAP@k of the teacher (Eq. 5)  skd, mAP@k (Eq. 6)
    (none)               1     1                                     skd (Eq. 4)
    --ce-only            1     -- (no teacher pass at all)           w/ ce (Table 2 baseline)
    --no-ce [--map-k]    0     1 or alpha                            w/o ce (Table 5 ablation)

alpha is computed per forward batch (per device micro-batch under DDP / --grad-accum, as in the
authors' code) from the TEACHER's logits against the gold positions, without gradients.

    python distill.py --ntl 5 --t 2 --map-k                   # -> runs/distill-ntl5-t2-skd-map
    python distill.py --ntl 5 --t 2                           # plain skd
    python distill.py --ntl 5 --ce-only                       # "w/ ce" baseline
    python distill.py --ntl 5 --t 2 --map-k --no-ce           # Table 5 ablation
    python distill.py --ntl 5 --t 2 --map-k --resume          # continue from the last checkpoint
    torchrun --nproc_per_node 4 distill.py --ntl 5 --t 2 --map-k     # DDP, batch 24 = 4 x 6
    python distill.py --ntl 5 --t 2 --map-k --model tiny --max-examples 200   # CPU smoke, ~1 min

--max-examples N keeps the first N sampled examples (the sample lists each XQuAD id's (1+ntl)^2
pairs together, so that is about N/(1+ntl)^2 ids with all their pairs).

Output directory (default runs/distill-ntl{ntl}-t{t}-{mode}; -ntl{ntl}-ce for --ce-only):
  config.json, model.safetensors, tokenizer files   the final model, written last (HF directory,
        loads in transformers.pipeline("question-answering")): the best-on-dev student by MLQA-dev
        G-XLT F1 (Sec. 5.2) when --mlqa-dir holds dev files, else the last student
  train_log.jsonl    one row per optimisation step: step, epoch (1-based), lr, loss, ce, kl, alpha
  alpha.png          alpha over training, epoch boundaries marked (Fig. 4 / Fig. 7)
  dev_metrics.jsonl  one row per epoch with MLQA-dev pairs, XLT and G-XLT (when evaluated)
  checkpoint/        config + tokenizer of the run and state.pt: student, teacher, optimiser,
        scheduler, RNG states of every rank, epochs done, step, best dev score; replaced
        atomically at the end of every epoch; --resume continues from it (same final weights as
        an uninterrupted run; bitwise on CPU). The data order is a function of (seed, epoch).
  best-epoch{N}/     the best-on-dev student so far (moved to the top level at the end)
"""
import argparse
import contextlib
import glob
import json
import math
import os
import random
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import prepare
import train_qa
from common import (LANGUAGES, MLQA_DIR, XQUAD_DIR, ArgumentParser, InputError, atomic_write_json, atomic_write_text,
                    load_squad_examples, read_json, run_main)
from evaluate_mlqa import mlqa_pair_path, mlqa_task, predict_tasks, score_tasks
from map_at_k import VARIANTS, map_at_k
from sample import sample_cross_lingual
from train_qa import (MASK_VALUE, build_features, ce_loss, collate, length_grouped_batches,
                      load_model_and_tokenizer, make_optimizer, make_scheduler, optimizer_step,
                      qa_logits, save_model, setup_distributed)

# -------------------------------------------------------------------- defaults (Sec. 5.2, DESIGN)
MODEL = "runs/mbert-qa-en"                 # phase 1's output
NTL, T = 5, 2.0                            # target languages per id (Eq. 3), KD temperature
EPOCHS, LR, BATCH_SIZE, SEED = 3, 5e-5, 24, 3   # the authors' scripts: 5e-5, 6 x 4 = 24, 3 epochs
K, DELTA, MAP_VARIANT = 10, 5, "first-hit"  # Eq. 5: top-k, window of 2*delta tokens, score
MAX_LENGTH, STRIDE = train_qa.MAX_LENGTH, train_qa.STRIDE
# options that must match for --resume (the rest, e.g. --mlqa-dir, may change)
RESUME_KEYS = ("model", "ntl", "t", "mode", "k", "delta", "map_variant", "epochs", "lr",
               "batch_size", "grad_accum", "seed", "max_examples", "max_length", "stride",
               "weight_decay", "xquad_dir")


class NonFiniteLoss(Exception):
    """The loss became NaN/inf: the run stops, the last checkpoint stays as it was."""


# -------------------------------------------------------------------- the loss (Eq. 4, Eq. 6)
def mode_name(ce_only=False, map_k=False, no_ce=False):
    if ce_only:
        return "ce"
    return ("skd-map" if map_k else "skd") + ("-noce" if no_ce else "")


def coefficients(mode, alpha=None):
    """(a_ce, a_kl) of Eq. 4 for a mode; with mAP@k, a_kl = alpha (Eq. 6) and a_ce = 1."""
    a_ce = 0.0 if mode.endswith("-noce") else 1.0
    if mode == "ce":
        return a_ce, 0.0
    if mode.startswith("skd-map"):
        if alpha is None:
            raise ValueError("mode skd-map needs alpha (Eq. 5)")
        return a_ce, alpha
    return a_ce, 1.0


def kl_term(student_logits, teacher_logits, allowed, t):
    """t^2 * KL(p_teacher^t || p_student^t) over the allowed positions, batch mean (Eq. 4)."""
    # Eq. 1 at temperature t: softmax over the allowed positions only
    log_p_s = F.log_softmax(student_logits.float().masked_fill(~allowed, MASK_VALUE) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float().masked_fill(~allowed, MASK_VALUE) / t, dim=-1)
    terms = torch.where(allowed, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(log_p_s))
    return terms.sum(dim=-1).mean() * (t * t)


def distill_loss(start_logits, end_logits, start_positions, end_positions, allowed,
                 teacher_start=None, teacher_end=None, t=T, a_ce=1.0, a_kl=1.0):
    """Eq. 4 / Eq. 6 -> (loss, ce, kl); kl is None without teacher logits (the "w/ ce" mode).

    CE: train_qa.ce_loss (Eq. 2), mean over the batch of (CE_start + CE_end) / 2, at t = 1.
    KL: (KL_start + KL_end) / 2 with temperature t on both sides, x t^2, batch mean.
    Positions where `allowed` is False are outside every softmax (Eq. 1).
    """
    start_logits = start_logits.float().masked_fill(~allowed, MASK_VALUE)
    end_logits = end_logits.float().masked_fill(~allowed, MASK_VALUE)
    ce = ce_loss(start_logits, end_logits, start_positions, end_positions)     # Eq. 2
    if teacher_start is None:
        return a_ce * ce, ce, None
    kl = (kl_term(start_logits, teacher_start, allowed, t) +
          kl_term(end_logits, teacher_end, allowed, t)) / 2
    loss = a_kl * kl if a_ce == 0 else a_ce * ce + a_kl * kl                   # Eq. 4 / Eq. 6
    return loss, ce, kl


# -------------------------------------------------------------------- one training step
class StepOptions(NamedTuple):
    """What a training step needs to know of the run: the mode and Eq. 4-6's hyper-parameters."""
    mode: str = "skd-map"
    t: float = T
    k: int = K
    delta: int = DELTA
    map_variant: str = MAP_VARIANT


def forward_backward(model, teacher, batch, opts, scale=1.0, rows=None):
    """One micro-batch: teacher pass (eval, no gradients), alpha of Eq. 5 from the teacher's logits
    against the gold positions, student pass, the loss of Eq. 4 / Eq. 6, backward of scale * loss.
    teacher is None in the "ce" mode. Returns the detached [loss, ce, kl, a_kl] (no host sync).

    rows: run both models over slices of this many rows (train_qa.compute_rows: a CPU runs 8-row
    slices faster than a 24-row batch). The loss and its gradient are the same: CE and KL are
    means over the rows, and alpha, a weight per batch (Eq. 6), is computed once over all of them.
    """
    n = batch["input_ids"].shape[0]
    parts = [{k: v[lo:lo + (rows or n)] for k, v in batch.items()} for lo in range(0, n, rows or n)]
    t_logits = alpha = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = [qa_logits(teacher, part) for part in parts]
        if opts.mode.startswith("skd-map"):
            # Eq. 5 on the teacher's logits of the whole batch -> a_kl of Eq. 6
            alpha = map_at_k(torch.cat([s for s, _ in t_logits]), torch.cat([e for _, e in t_logits]),
                             batch["start_positions"], batch["end_positions"],
                             opts.k, opts.delta, opts.map_variant, mask=batch["allowed"])
    a_ce, a_kl = coefficients(opts.mode, alpha)
    stats = torch.zeros(3, device=batch["input_ids"].device)
    for i, part in enumerate(parts):
        share = part["input_ids"].shape[0] / n
        s_start, s_end = qa_logits(model, part)
        t_start, t_end = t_logits[i] if t_logits is not None else (None, None)
        loss, ce, kl = distill_loss(s_start, s_end, part["start_positions"], part["end_positions"],
                                    part["allowed"], t_start, t_end, opts.t, a_ce, a_kl)
        (loss * (scale * share)).backward()
        stats += share * torch.stack([loss.detach(), ce.detach(),
                                      torch.zeros_like(ce) if kl is None else kl.detach()])
    return torch.cat([stats, torch.as_tensor(a_kl, dtype=torch.float32, device=stats.device).view(1)])


# -------------------------------------------------------------------- MLQA dev (Sec. 5.2)
def load_mlqa_dev(mlqa_dir):
    """{"q-c": examples} for the dev files present in `mlqa_dir`/dev."""
    sets = {}
    for q in LANGUAGES:
        for c in LANGUAGES:
            path = mlqa_pair_path(mlqa_dir, "dev", q, c)
            if os.path.isfile(path):
                sets[f"{q}-{c}"] = load_squad_examples(path)
    if not sets:
        raise InputError(f"{mlqa_dir}: no MLQA dev files (dev/dev-context-C-question-Q.json)")
    return sets


def evaluate_dev(model, tokenizer, dev_sets, device, feature_cache=None):
    """MLQA-dev F1/EM per (question, context) pair, XLT (q == c) and G-XLT (q != c) means, and
    per-context-language means: evaluate_mlqa.py's prediction and scoring of MLQA pairs.
    feature_cache: a dict kept across epochs, so MLQA dev is tokenised once per run."""
    tasks = [mlqa_task("dev", *key.split("-"), path=key, examples=examples)
             for key, examples in dev_sets.items()]
    predict_tasks(model, tokenizer, tasks, device=device, desc="MLQA dev",
                  feature_cache=feature_cache)
    return score_tasks(tasks)["mlqa-dev"]


def selection_score(metrics):
    """Sec. 5.2: the best model has the highest G-XLT F1 (XLT F1 when no G-XLT pair is present)."""
    return metrics["gxlt"]["f1"] if metrics["gxlt"]["f1"] is not None else metrics["xlt"]["f1"]


# -------------------------------------------------------------------- checkpoints and outputs
def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path, state):
    """torch.save under a temporary name, fsync, then one rename: never a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_alpha(rows, path):
    """Fig. 4 / Fig. 7: alpha per optimisation step, a vertical line at each epoch boundary."""
    import report
    rows = [r for r in rows if r.get("alpha") is not None]
    if not rows:
        return False
    fig, ax = report.pyplot().subplots(figsize=(8, 4), dpi=report.DPI)
    ax.plot([r["step"] for r in rows], [r["alpha"] for r in rows], lw=0.8)
    for prev, row in zip(rows, rows[1:]):
        if row["epoch"] != prev["epoch"]:
            ax.axvline(prev["step"] + 0.5, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(r"$\alpha_{kl}^{mAP@k}$")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("mAP@k coefficient during training (epochs dashed)")
    fig.tight_layout()
    report.save_figure(fig, path)              # atomic: temporary name, then rename
    return True


def read_log(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def best_dir(out, best):
    return os.path.join(out, f"best-epoch{best['epoch']}")


def remove_stale_best(out, best):
    """Keep only the best-epoch* directory the checkpoint names (a crash between saving a new
    best and the checkpoint that records it leaves one behind)."""
    keep = best_dir(out, best) if best else None
    for path in glob.glob(os.path.join(out, "best-epoch*")):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def install_model_dir(src, output_dir):
    """Move the files of the HF directory `src` into output_dir, config.json last: before it
    lands, output_dir is not a loadable model, so a crash never leaves a half-written one."""
    names = sorted(os.listdir(src), key=lambda n: n == "config.json")
    for name in names:
        os.replace(os.path.join(src, name), os.path.join(output_dir, name))
    shutil.rmtree(src)


# -------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL, help=f"mBERT-qa-en dir, hub name or 'tiny' (default {MODEL})")
    p.add_argument("--ntl", type=int, default=NTL, help="target languages per XQuAD id, 0..6 (Eq. 3)")
    p.add_argument("--t", type=float, default=T, help="distillation temperature, > 0")
    p.add_argument("--map-k", action="store_true", help="a_kl = mAP@k of the teacher (Eq. 5, 6)")
    p.add_argument("--no-ce", action="store_true", help="a_ce = 0: KL only (Table 5 ablation)")
    p.add_argument("--ce-only", action="store_true", help="cross-entropy only, no teacher ('w/ ce')")
    p.add_argument("--k", type=int, default=K, help="top-k of Eq. 5")
    p.add_argument("--delta", type=int, default=DELTA, help="window half-width of Eq. 5")
    p.add_argument("--map-variant", default=MAP_VARIANT, choices=VARIANTS)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--xquad-dir", default=XQUAD_DIR)
    p.add_argument("--mlqa-dir", default=None, help=f"MLQA v1 for dev selection (default {MLQA_DIR} "
                                                    "when present)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="effective batch per step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=train_qa.WEIGHT_DECAY)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--max-examples", type=int, default=None, help="keep the first N sampled examples")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--stride", type=int, default=STRIDE)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)  # tests
    prepare.add_arguments(p)                  # --no-prepare (and test-only overrides)
    args = p.parse_args(argv)

    if not 0 <= args.ntl <= len(LANGUAGES) - 1:
        raise InputError(f"--ntl must be in 0..{len(LANGUAGES) - 1}, got {args.ntl}")
    if not (math.isfinite(args.t) and args.t > 0):
        raise InputError(f"--t must be a positive number, got {args.t}")
    for name in ("k", "delta", "epochs", "batch_size", "grad_accum", "max_length"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    if not 0 < args.stride < args.max_length:
        raise InputError("--stride must be between 0 and --max-length")
    if args.max_examples is not None and args.max_examples < 1:
        raise InputError("--max-examples must be at least 1")
    if args.ce_only and (args.map_k or args.no_ce):
        raise InputError("--ce-only cannot be combined with --map-k or --no-ce")
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    args.mode = mode_name(args.ce_only, args.map_k, args.no_ce)
    if args.output_dir is None:
        tag = "ce" if args.ce_only else f"t{args.t:g}-{args.mode}"
        args.output_dir = os.path.join("runs", f"distill-ntl{args.ntl}-{tag}")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.output_dir)
    ckpt_dir, state_path = os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint", "state.pt")
    log_path, dev_path = os.path.join(out, "train_log.jsonl"), os.path.join(out, "dev_metrics.jsonl")
    run_args = {key: getattr(args, key) for key in RESUME_KEYS}
    if os.path.exists(out) and not (args.overwrite or args.resume):
        raise InputError(f"{args.output_dir}: output directory exists "
                         "(pass --overwrite to replace it or --resume to continue it)")
    if args.resume:
        if not os.path.isfile(state_path):
            raise InputError(f"{args.output_dir}: no checkpoint to resume ({state_path} not found)")
        saved = read_json(os.path.join(out, "args.json"))
        diff = [k for k in RESUME_KEYS if saved.get(k) != run_args[k]]
        if diff:
            raise InputError("--resume with options that differ from the checkpoint's run: " +
                             ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {run_args[k]})"
                                       for k in diff))
    mlqa_dir = args.mlqa_dir or MLQA_DIR
    if args.mlqa_dir is not None and not os.path.isdir(args.mlqa_dir):
        raise InputError(f"{args.mlqa_dir}: MLQA directory not found (--mlqa-dir)")
    prepare.prepare_inputs(args)        # default --model missing: download data, build phase 1
    if args.model == MODEL and not args.resume and not os.path.isdir(MODEL):
        raise InputError(f"{MODEL}: not found; train mBERT-qa-en first (python train_qa.py) "
                         "or pass --model")

    # ---------------------------------------------------------------- data (Sec. 4.2, Eq. 3)
    examples = sample_cross_lingual(args.xquad_dir, args.ntl, args.seed)[:args.max_examples]
    rank, world_size, device, is_master = setup_distributed()
    ddp = world_size > 1
    if ddp:      # every rank has checked the output directory before the master touches it
        torch.distributed.barrier()
    micro = args.batch_size // (world_size * args.grad_accum)
    if micro < 1 or micro * world_size * args.grad_accum != args.batch_size:
        raise InputError(f"--batch-size {args.batch_size} is not a multiple of world size "
                         f"{world_size} x --grad-accum {args.grad_accum}")
    torch.set_float32_matmul_precision("high")

    # ---------------------------------------------------------------- models (Sec. 4.3)
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer
    if args.resume:   # the run's own config and tokenizer; weights from state.pt below
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        student = AutoModelForQuestionAnswering.from_config(AutoConfig.from_pretrained(ckpt_dir))
    else:             # every rank loads (a bad --model fails everywhere alike) ...
        texts = [x for ex in examples for x in (ex["question"], ex["context"])]
        student, tokenizer = load_model_and_tokenizer(args.model, texts=texts, seed=args.seed,
                                                      require_qa_head=True)  # else one error line
    dev_sets = load_mlqa_dev(mlqa_dir) if os.path.isdir(mlqa_dir) else None   # Sec. 5.2
    dev_features = {}                      # MLQA dev windows, tokenised at the first evaluation
    features = build_features(examples, tokenizer, args.max_length, args.stride)
    per_epoch = len(length_grouped_batches([len(x) for x in features["input_ids"]], micro,
                                           args.seed, 0, rank=rank, world_size=world_size))
    if per_epoch == 0:
        raise InputError(f"{len(features['input_ids'])} training windows are fewer than one batch "
                         "per process (--batch-size, --max-examples)")
    steps_per_epoch = math.ceil(per_epoch / args.grad_accum)
    if not args.resume:
        if is_master:  # a fresh output directory: config + tokenizer of the run first
            if os.path.exists(out):
                shutil.rmtree(out)
            os.makedirs(ckpt_dir)
            student.config.save_pretrained(ckpt_dir)
            tokenizer.save_pretrained(ckpt_dir)
            atomic_write_json(os.path.join(out, "args.json"), run_args, indent=1)
        if ddp:       # every rank built the same tokenizer (a tiny one is a function of the
            torch.distributed.barrier()   # text); DDP broadcasts the master's weights below
    lengths = np.array([len(x) for x in features["input_ids"]])
    student.to(device).train()
    model = student
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    teacher = None
    if args.mode != "ce":        # a persistent module of the same architecture, synced by copy
        teacher = AutoModelForQuestionAnswering.from_config(student.config).to(device)
        teacher.load_state_dict(student.state_dict())     # generation 0: the initial model
        teacher.eval().requires_grad_(False)
    optimizer = make_optimizer(student, args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, steps_per_epoch * args.epochs)
    torch.manual_seed(args.seed + rank)                    # dropout stream, as train_qa
    start_epoch, step, best = 0, 0, None
    if args.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        student.load_state_dict(state["student"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        if state["world_size"] == world_size:
            set_rng_state(state["rng"][rank])
        elif is_master:
            print(f"note: checkpoint from {state['world_size']} processes, now {world_size}: "
                  "RNG streams restart (weights will not match an uninterrupted run exactly)")
        del state
        if start_epoch >= args.epochs and os.path.isfile(os.path.join(out, "config.json")):
            if is_master:
                print(f"{args.output_dir}: the run is complete (epoch {start_epoch}/{args.epochs})")
            return _finish(ddp)
        if is_master:  # forget what the interrupted epoch wrote after the checkpoint
            for path, key, last in ((log_path, "step", step), (dev_path, "epoch", start_epoch)):
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                for r in read_log(path) if r[key] <= last))
            remove_stale_best(out, best)

    if is_master:
        print(f"{len(examples)} examples (ntl={args.ntl}) -> {len(lengths)} windows; mode {args.mode}; "
              f"{steps_per_epoch} steps/epoch x {args.epochs}; device {device} x {world_size}; "
              f"MLQA dev: {len(dev_sets) if dev_sets else 'none'}" +
              (f"; resuming after epoch {start_epoch}" if args.resume else ""))

    # ---------------------------------------------------------------- training loop
    log_file = open(log_path, "a", encoding="utf-8") if is_master else None
    opts = StepOptions(args.mode, args.t, args.k, args.delta, args.map_variant)
    rows = train_qa.compute_rows(device)
    for epoch in range(start_epoch, args.epochs):
        if teacher is not None and epoch > 0:
            teacher.load_state_dict(student.state_dict())  # Sec. 4.3: new generation
        student.train()
        batches = length_grouped_batches(lengths, micro, args.seed, epoch, rank=rank,
                                         world_size=world_size)
        t0 = time.time()
        for first in range(0, len(batches), args.grad_accum):
            group = batches[first:first + args.grad_accum]
            stats = torch.zeros(4, device=device)           # loss, ce, kl, a_kl of this step
            for i, idx in enumerate(group):
                batch = collate(features, idx, tokenizer.pad_token_id, device)
                sync = model.no_sync() if ddp and i + 1 < len(group) else contextlib.nullcontext()
                with sync:
                    stats += forward_backward(model, teacher, batch, opts, scale=1 / len(group),
                                              rows=rows)
            stats /= len(group)
            if ddp:
                torch.distributed.all_reduce(stats)
                stats /= world_size
            loss_v, ce_v, kl_v, a_v = stats.tolist()
            step += 1
            if not math.isfinite(loss_v):
                where = (f"the last good checkpoint ({state_path}, after epoch {epoch}) is intact: "
                         "--resume continues from it, or restart with a lower --lr") if epoch > 0 \
                    else "no checkpoint yet (first epoch): restart with --overwrite and a lower --lr"
                raise NonFiniteLoss(f"non-finite loss ({loss_v}) at step {step}, epoch {epoch + 1}; "
                                    f"stopped; {where}")
            lr = scheduler.get_last_lr()[0]
            optimizer_step(student, optimizer, scheduler)
            if is_master:
                log_file.write(json.dumps({"step": step, "epoch": epoch + 1, "lr": lr, "loss": loss_v,
                                           "ce": ce_v, "kl": None if teacher is None else kl_v,
                                           "alpha": None if teacher is None else a_v}) + "\n")
                log_file.flush()

        # ------------------------------------------------------------ end of epoch: dev, checkpoint
        metrics = None
        if is_master and dev_sets:
            metrics = evaluate_dev(student, tokenizer, dev_sets, device, dev_features)
            score = selection_score(metrics)
            improved = best is None or score > best["score"]
            if improved:
                best = {"score": score, "epoch": epoch + 1}
                save_model(student, tokenizer, best_dir(out, best), overwrite=True)
            with open(dev_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": epoch + 1, "xlt": metrics["xlt"], "gxlt": metrics["gxlt"],
                                    "pairs": metrics["pairs"], "best": improved}) + "\n")
        rngs = [None] * world_size
        if ddp:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if is_master:
            save_state(state_path, {
                "student": student.state_dict(),
                "teacher": teacher.state_dict() if teacher is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rngs, "epoch": epoch + 1, "step": step, "best": best,
                "world_size": world_size, "args": run_args})
            remove_stale_best(out, best)
            msg = f"epoch {epoch + 1}/{args.epochs}: step {step}, loss {loss_v:.4f}, " \
                  f"{time.time() - t0:.0f}s"
            if metrics is not None:
                msg += f"; MLQA dev G-XLT F1 {metrics['gxlt']['f1']}, XLT F1 {metrics['xlt']['f1']}"
            print(msg, flush=True)
        if ddp:
            torch.distributed.barrier()
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch \
                and epoch + 1 < args.epochs:
            if log_file:
                log_file.close()
            if is_master:
                print(f"stopped after epoch {epoch + 1} (--stop-after-epoch); --resume continues")
            return _finish(ddp)
    if log_file:
        log_file.close()

    # ---------------------------------------------------------------- final model
    if is_master:
        if plot_alpha(read_log(log_path), os.path.join(out, "alpha.png")):
            print(f"wrote {os.path.join(args.output_dir, 'alpha.png')}")
        if best is not None and os.path.isdir(best_dir(out, best)):
            print(f"final model: best on MLQA dev (epoch {best['epoch']}, score {best['score']:.2f})")
            install_model_dir(best_dir(out, best), out)
        else:
            staging = os.path.join(out, ".tmp-final")
            shutil.rmtree(staging, ignore_errors=True)
            save_model(student, tokenizer, staging)
            install_model_dir(staging, out)
        print(f"saved {args.output_dir}")
    _finish(ddp)


def _finish(ddp):
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def cli():
    try:
        run_main(main)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    cli()
