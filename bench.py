"""Benchmark: phase-2 training and evaluation throughput against the authors' configuration.

    python bench.py --quick --json                # CPU, the tiny shape, about a minute; last line = JSON
    python bench.py --quick --json --shape small  # CPU, a larger shape (hidden 256, 4 layers), minutes
    python bench.py --quick --json --precision bf16   # CPU: ours in fp32 and under bf16 autocast (AMX)
    python bench.py --shape mbert-base            # the real mBERT-base dimensions (GPU), random weights
    python bench.py --shape mbert-base --json --steps 20 --reps 5
    python bench.py --significance                # the paired bootstrap of two models, MLQA-test size
    python bench.py --profile --shape small       # torch.profiler: where a phase-2 step's time goes,
                                                  # by op group, fp32 and bf16 (CUDA: kernel time)
    python bench.py --quick --json --compile      # + rows of ours under torch.compile (--compile)
    python bench.py --save-model runs/small       # the small stand-in as a model directory, to time
                                                  # distill.py itself: --model runs/small
    python bench.py --end-to-end 10               # distill.py itself, fp32 against bf16: 10 rounds of
                                                  # fresh runs on the small stand-in (issue 20),
                                                  # beside the matmul probe's bf16/fp32 ratio

Both sides run on the same cross-lingual XQuAD sample (sample.py, ntl=5, seed=3), the same model
shape and the same random weights, in one process:

  ours       distill.py's real training step (distill.row_passes, forward_backward, optimizer_step:
             length-grouped batches padded to their longest window, SDPA attention, Eq. 1's
             softmax over allowed positions, vectorised mAP@k, bf16 autocast and fused AdamW on
             CUDA, the teacher a persistent module synced by load_state_dict) and train_qa.predict's
             inference + vectorised answer extraction (as evaluate_mlqa.py runs it).
  reference  the configuration of the authors' scripts, implemented faithfully here: micro-batch 6
             x 4 accumulation, every window padded to 384, fp32 (no TF32), eager attention,
             softmax/KL over all 384 positions, their mAP@k as Python loops over top-k indices, the
             teacher deep-copied each generation, a per-parameter AdamW; evaluation in batches of
             8 with the legacy SQuAD post-processing (Python lists, sorted n-best, pairwise checks).

Throughput is windows ("features") per second; warm-up steps are excluded; each side is timed over
several repetitions and the median is reported. Two sides of the same precision share oneDNN's
cache of kernels built per shape, so the second meets fewer new shapes (bf16 on a CPU: ~8% faster
for that alone, 2026-12-01): compare two variants of one precision in separate runs. On CUDA,
MFU (model FLOPs of the real, unpadded tokens over the GPU's dense bf16 peak) and peak memory are
reported too. With --precision bf16
on a CPU, ours is timed twice, in fp32 (a CPU's default) and under bf16 autocast: the rows
ours_bf16_fps, bf16_over_fp32 (the ratio of the two) and bf16_same_answers (evaluation answers
equal to fp32's). Every run starts with a matmul probe (fp32 and bf16 GFLOP/s of one large
matmul: the device's practical peak); ours_gflops is the model FLOP rate a training step reaches
(4 forward passes per real token: the teacher's, the student's forward and backward), and
ours_peak_fraction its share of the probe's rate at the same precision.
"""
import contextlib
import copy
import functools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401 (first: OpenMP's wait policy before torch loads it)
import numpy as np
import torch
import torch.nn.functional as F

import distill
import evaluate_mlqa
import train_qa
from common import (LANGUAGES, XQUAD_DIR, ArgumentParser, InputError, atomic_output_dir,
                    check_writable, run_main, save_tokenizer)
from sample import sample_cross_lingual

SHAPES = {  # BERT dimensions; vocab None = the tiny tokenizer's own vocabulary
    "tiny": dict(train_qa.TINY_CONFIG, vocab_size=None),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  max_position_embeddings=512, vocab_size=None),
    "mbert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=512, vocab_size=119547),
}
BENCH_VOCAB = 30000
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU
PROBE_SECONDS = 0.1     # matmul_probe stops growing its matrices once one multiplication takes this


# -------------------------------------------------------------------- the reference configuration
# The authors' scripts (run_squad_w_distillation.py + train_skd_map.sh / eval_qa.sh): micro-batch 6
# x 4 accumulation, eval batch 8, fp32, windows padded to 384, KL over all 384 positions, their
# mAP@k from softmax + top-k followed by Python loops (one relevant item: the first-hit variant),
# the teacher deep-copied each epoch, a per-parameter AdamW, and the legacy SQuAD post-processing
# (logits to Python lists, every position sorted for the n-best, candidates checked one by one,
# a per-example n-best with a Python softmax). Written here from their description, not copied.
REF_MICRO_BATCH, REF_EVAL_BATCH = 6, 8


@torch.no_grad()
def reference_map_at_k(start_logits, end_logits, start_positions, end_positions, k=10, delta=5, t=2.0):
    """Their coefficient: top-k of the softmax, then a Python loop per example and rank."""
    def average(logits, gold):
        top = F.softmax(logits / t, dim=-1).topk(k=k).indices.tolist()
        aps = []
        for ranked, g in zip(top, gold.tolist()):
            window = range(g - delta, g + delta)
            hits = [1 if j in window else 0 for j in ranked]
            first = next((r for r, h in enumerate(hits, 1) if h), None)
            aps.append(1.0 / first if first else 0.0)
        return float(np.mean(aps))
    return (average(start_logits, start_positions) + average(end_logits, end_positions)) / 2


def reference_step(student, teacher, batch, optimizer, t=2.0, micro_batch=REF_MICRO_BATCH):
    """One optimisation step of their configuration: micro-batches of 6 padded to 384, CE inside
    the model's head over all positions, KL over all positions, loss / accumulation steps."""
    n = batch["input_ids"].shape[0]
    chunks = [slice(i, i + micro_batch) for i in range(0, n, micro_batch)]
    for part in chunks:
        inputs = dict(input_ids=batch["input_ids"][part], token_type_ids=batch["token_type_ids"][part],
                      attention_mask=batch["attention_mask"][part])
        out = student(**inputs, start_positions=batch["start_positions"][part],
                      end_positions=batch["end_positions"][part])
        with torch.no_grad():
            teacher_out = teacher(**inputs)
        kl = sum(F.kl_div(F.log_softmax(s / t, -1), F.softmax(te / t, -1), reduction="batchmean")
                 for s, te in ((out.start_logits, teacher_out.start_logits),
                               (out.end_logits, teacher_out.end_logits))) / 2 * t * t
        alpha = reference_map_at_k(teacher_out.start_logits, teacher_out.end_logits,
                                   batch["start_positions"][part], batch["end_positions"][part], t=t)
        ((out.loss + alpha * kl) / len(chunks)).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), train_qa.MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _best_indexes(logits, n_best):
    return [i for i, _ in sorted(enumerate(logits), key=lambda x: x[1], reverse=True)[:n_best]]


def _python_softmax(scores):
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    return [e / sum(exps) for e in exps]


def reference_extract(start_logits, end_logits, offsets, context_mask, n_best=train_qa.N_BEST,
                      max_answer_tokens=train_qa.MAX_ANSWER_TOKENS):
    """Legacy candidate search of one example's windows: lists of Python floats per window, the
    n_best positions by sorting all of them, every (start, end) pair checked one by one.
    Returns the candidates (score, window, start char, end char), best first."""
    prelim = []
    for f, (s_log, e_log) in enumerate(zip(start_logits, end_logits)):
        for s in _best_indexes(s_log, n_best):
            for e in _best_indexes(e_log, n_best):
                if s >= len(offsets[f]) or e >= len(offsets[f]) or not context_mask[f][s] \
                        or not context_mask[f][e] or e < s or e - s + 1 > max_answer_tokens:
                    continue
                prelim.append((s_log[s] + e_log[e], f, int(offsets[f][s][0]), int(offsets[f][e][1])))
    return sorted(prelim, key=lambda x: x[0], reverse=True)


def _strip_spaces_map(text):
    """Legacy alignment helper: text without spaces, and its char index -> original index."""
    chars, index = [], {}
    for i, c in enumerate(text):
        if c != " ":
            index[len(chars)] = i
            chars.append(c)
    return "".join(chars), index


def _legacy_final_text(context, a, b):
    """The legacy post-processing's text step for one n-best candidate, kept for its cost: the
    candidate's whole words are re-tokenised with BERT's basic tokenizer and the two texts are
    aligned character by character. The answer returned is the offsets' span, as ours, so both
    sides give comparable answers (legacy's rebuilt text differs in spacing for some scripts)."""
    left = context.rfind(" ", 0, a) + 1
    right = context.find(" ", b)
    orig = context[left:right if right >= 0 else len(context)]
    tokens = " ".join(_basic_tokenizer().tokenize(orig))
    _strip_spaces_map(orig), _strip_spaces_map(tokens)
    return context[a:b]


@functools.lru_cache(maxsize=1)
def _basic_tokenizer():
    """BERT's basic (pre-)tokenizer, cased, as the legacy post-processing builds it."""
    try:
        from transformers.models.bert.tokenization_bert import BasicTokenizer
    except ImportError:         # transformers 5.x keeps it in the legacy module only
        from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer
    return BasicTokenizer(do_lower_case=False)


def reference_predict(model, features, examples, device):
    """Their evaluation: windows padded to 384 in batches of 8, fp32, logits copied to Python
    lists, legacy candidate search, a distinct-text n-best per example with a Python softmax."""
    n = len(features["input_ids"])
    start_lists, end_lists = [None] * n, [None] * n
    with torch.inference_mode():
        for lo in range(0, n, REF_EVAL_BATCH):
            idx = np.arange(lo, min(n, lo + REF_EVAL_BATCH))
            batch = collate_full(features, idx, device)
            out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                        attention_mask=batch["attention_mask"])
            for row, i in enumerate(idx):
                start_lists[i] = out.start_logits[row].float().cpu().tolist()
                end_lists[i] = out.end_logits[row].float().cpu().tolist()
    by_example = {}
    for f, ex in enumerate(features["example_index"].tolist()):
        by_example.setdefault(ex, []).append(f)
    predictions = {}
    for ex, feats in by_example.items():
        context = examples[ex]["context"]
        masks = [np.concatenate([[False], features["allowed"][f][1:]]) for f in feats]  # no [CLS]
        candidates = reference_extract([start_lists[f] for f in feats], [end_lists[f] for f in feats],
                                       [features["offsets"][f] for f in feats], masks)
        nbest, seen = [], set()
        for score, _, a, b in candidates:
            if len(nbest) == train_qa.N_BEST:
                break
            text = _legacy_final_text(context, a, b)
            if text not in seen:
                seen.add(text)
                nbest.append((text, score))
        nbest = nbest or [("", 0.0)]
        _python_softmax([score for _, score in nbest])       # the n-best probabilities they write
        predictions[examples[ex]["id"]] = nbest[0][0]
    return predictions


def collate_full(features, indices, device):
    """Every window padded to the full 384 positions, as the authors' preprocessing does."""
    batch = train_qa.collate(features, indices, 0, device)
    pad = train_qa.MAX_LENGTH - batch["input_ids"].shape[1]
    return {k: (F.pad(v, (0, pad)) if v.dim() == 2 else v) for k, v in batch.items()}


# -------------------------------------------------------------------- setup and timing
def build_models(shape, tokenizer, device, attn):
    from transformers import BertConfig, BertForQuestionAnswering
    dims = dict(SHAPES[shape])
    dims["vocab_size"] = dims["vocab_size"] or len(tokenizer)
    torch.manual_seed(0)
    config = BertConfig(pad_token_id=tokenizer.pad_token_id, attn_implementation=attn, **dims)
    return BertForQuestionAnswering(config).to(device)


def model_flops_per_token(model, seq_len):
    """Forward FLOPs per token: 2 x non-embedding parameters + attention scores (2 x 2 x L x d x layers)."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 2 * params + 4 * cfg.num_hidden_layers * seq_len * cfg.hidden_size


def interleaved(sides, reps, device):
    """Time each side's run() `reps` times, alternating sides, so that a slow period of a shared
    machine hits both alike. sides: {name: (run, context manager factory)} -> {name: [seconds]}."""
    times = {name: [] for name in sides}
    for _ in range(reps):
        for name, (run, context) in sides.items():
            with context():
                _sync(device)
                t0 = time.perf_counter()
                run()
                _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _sync(device):
    """Wait for `device`'s kernels. Here and in the memory statistics the device is named: without
    it torch.cuda means the current GPU, cuda:0 under --device cuda:1 (timings ending before the
    kernels, peak memory 0)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_since(device, base):
    """Peak GiB allocated since the last reset, above `base` bytes (what was resident before)."""
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - base) / 2 ** 30, 2)


def _reset_peak(device):
    if device.type != "cuda":
        return 0
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def bench_train(features, tokenizer, shape, device, steps, reps, warmup, batch_size, bf16=False,
                compiled=False):
    """Training rows: ours (distill.py's step at the device's default precision: bf16 autocast on
    CUDA, fp32 on a CPU) and the reference; with bf16 on a CPU, ours under bf16 autocast too."""
    lengths = np.array([len(x) for x in features["input_ids"]])
    batches = [b for b in train_qa.length_grouped_batches(lengths, batch_size, 3, 0)
               if len(b) == batch_size]
    feed = lambda: (batches[i % len(batches)] for i in range(10 ** 9))  # noqa: E731
    tokens = {}

    def ours_side(name, precision, compile=False):
        """distill.py's code path, --map-k mode (its defaults otherwise: first-hit, 6-row alpha
        groups), each side with its own models from the same weights, at `precision`; compile:
        distill.py --compile."""
        student = build_models(shape, tokenizer, device, "sdpa").train()
        teacher = distill.frozen_copy(student)
        if compile:
            distill.compile_forward(student, teacher)
        optimizer = train_qa.make_optimizer(student, distill.LR, 0.0)
        scheduler = train_qa.make_scheduler(optimizer, 10 ** 6)
        opts = distill.StepOptions(map_k=True, t=2.0, precision=precision)
        multiple = train_qa.pad_multiple(device, precision, train_qa.MAX_LENGTH)   # as distill.py
        stream, tokens[name] = feed(), []

        def steps_of(n):
            def run():
                teacher.load_state_dict(student.state_dict())      # one generation sync per rep
                for _ in range(n):
                    idx = next(stream)
                    tokens[name].append(int(lengths[idx].sum()))
                    for rows, share in distill.row_passes([idx], opts.alpha_rows, device):
                        batch = train_qa.collate(features, rows, tokenizer.pad_token_id, device,
                                                 multiple=multiple)
                        distill.forward_backward(student, teacher, batch, opts, share)
                    distill.optimizer_step(student, optimizer, scheduler)
            return run
        return steps_of, student

    base = _reset_peak(device)
    ours, student = ours_side("ours", "auto")
    ours(warmup)()
    mem_ours = _peak_since(device, base)
    sides = {"ours": (ours(steps), contextlib.nullcontext)}
    if bf16:
        ours_bf16 = ours_side("ours_bf16", "bf16")[0]
        ours_bf16(warmup)()
        sides["ours_bf16"] = (ours_bf16(steps), contextlib.nullcontext)
    if compiled:                # --compile: ours again, compiled, at each precision timed above
        for name in list(sides):
            side = ours_side(name + "_compiled", "bf16" if name == "ours_bf16" else "auto", True)[0]
            side(warmup)()                               # compiles (not timed)
            sides[name + "_compiled"] = (side(steps), contextlib.nullcontext)

    # reference: their configuration (see the top of this file)
    base = _reset_peak(device)
    ref_student = build_models(shape, tokenizer, device, "eager").train()
    ref_optimizer = torch.optim.AdamW(ref_student.parameters(), lr=distill.LR, fused=False,
                                      foreach=False)
    ref_batches = feed()

    def reference(n):
        def run():
            teacher = copy.deepcopy(ref_student).eval()            # the authors' generation sync
            for _ in range(n):
                reference_step(ref_student, teacher, collate_full(features, next(ref_batches), device),
                               ref_optimizer)
        return run
    with fp32_matmul():
        reference(warmup)()
    mem_ref = _peak_since(device, base)

    for name in tokens:
        tokens[name].clear()
    sides["reference"] = (reference(steps), fp32_matmul)
    times = interleaved(sides, reps, device)
    fps = {name: steps * batch_size / statistics.median(t) for name, t in times.items()}
    out = _rows(fps)
    # teacher forward (1x) + student forward and backward (3x) = 4 forward passes per token
    flops_tok = model_flops_per_token(student, int(lengths.mean()))
    for name in tokens:         # the achieved model FLOP rate of each side of ours (issue 20)
        out[f"{name}_gflops"] = round(4 * flops_tok * sum(tokens[name]) / sum(times[name]) / 1e9, 1)
    if device.type == "cuda":
        tok_per_s = sum(tokens["ours"]) / sum(times["ours"])
        out.update(ours_mfu=round(4 * flops_tok * tok_per_s / _peak_flops(device), 4),
                   ours_peak_mem_gib=mem_ours, reference_peak_mem_gib=mem_ref)
    return out


def _rows(fps):
    """Windows/s of each side and the ratios: ours / reference, and ours_bf16 / ours (fp32)."""
    out = dict(ours_fps=round(fps["ours"], 2), reference_fps=round(fps["reference"], 2),
               speedup=round(fps["ours"] / fps["reference"], 2))
    if "ours_bf16" in fps:
        out.update(ours_bf16_fps=round(fps["ours_bf16"], 2),
                   bf16_over_fp32=round(fps["ours_bf16"] / fps["ours"], 2),
                   bf16_speedup=round(fps["ours_bf16"] / fps["reference"], 2))
    for name in ("ours", "ours_bf16"):             # --compile: compiled over eager
        if name + "_compiled" in fps:
            out.update({f"{name}_compiled_fps": round(fps[name + "_compiled"], 2),
                        f"{name}_compiled_over_eager": round(fps[name + "_compiled"] / fps[name], 2)})
    return out


def bench_eval(examples, features, tokenizer, shape, device, reps, bf16=False):
    """Evaluation rows: train_qa.predict (at the device's default precision, and with bf16 on a
    CPU under bf16 autocast too) and the reference's evaluation, on the same weights."""
    n = len(features["input_ids"])
    base = _reset_peak(device)
    model = build_models(shape, tokenizer, device, "sdpa").eval()

    def ours_at(precision):
        return lambda: train_qa.predict(model, tokenizer, examples, device=device, features=features,
                                        precision=precision)
    ours_answers = ours_at("auto")()                                 # warm-up
    mem_ours = _peak_since(device, base)
    ref_model = build_models(shape, tokenizer, device, "eager").eval()
    ref_model.load_state_dict(model.state_dict())
    reference = lambda: reference_predict(ref_model, features, examples, device)  # noqa: E731
    with fp32_matmul():
        agree = _agreement(ours_answers, reference(), examples)     # also the warm-up
    sides = {"ours": (ours_at("auto"), contextlib.nullcontext)}
    if bf16:
        sides["ours_bf16"] = (ours_at("bf16"), contextlib.nullcontext)
        bf16_agree = _agreement(ours_answers, ours_at("bf16")(), examples)   # also its warm-up
    sides["reference"] = (reference, fp32_matmul)
    times = interleaved(sides, reps, device)
    out = _rows({name: n / statistics.median(t) for name, t in times.items()})
    out["same_answers"] = agree
    if bf16:
        out["bf16_same_answers"] = bf16_agree      # bf16 answers equal to ours in fp32
    if device.type == "cuda":
        out["ours_peak_mem_gib"] = mem_ours
    return out


def _agreement(a, b, examples):
    """Share of examples where both pipelines return the same answer text (bf16 on CUDA may differ)."""
    return round(sum(a[ex["id"]] == b.get(ex["id"], "") for ex in examples) / len(examples), 4)


class fp32_matmul:
    """The reference runs in true fp32 (no TF32) on CUDA. Set the way train_qa.set_matmul_precision
    sets it: torch >= 2.9 refuses a matmul, or a read of the precision, after its legacy
    `allow_tf32` flags and this API were both used."""
    def __enter__(self):
        self.old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.old)


def matmul_probe(device, dtype, n=None, reps=3):
    """GFLOP/s of one n x n x n matmul in `dtype` (the best of reps): the device's practical
    matmul peak, which the achieved rate of a step is compared with ("close to the limit" as a
    number on any machine). fp32 is true fp32 (no TF32). The size doubles from 256 up to n while
    one multiplication takes under PROBE_SECONDS (the first at a size is the warm-up): a device
    without fast kernels for dtype (bf16 on an AVX2 CPU: ~1 GFLOP/s) is measured at a smaller
    size in about a second, not in minutes at n (its rate hardly depends on the size)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    size = min(256, n)
    with fp32_matmul():
        while True:
            a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
            first = _timed_matmul(a, b, device)
            if size >= n or first >= PROBE_SECONDS:
                break
            size = min(2 * size, n)
        best = min(_timed_matmul(a, b, device) for _ in range(reps))
    return round(2 * size ** 3 / best / 1e9, 1)


def matmul_peaks(device):
    """The probe in both precisions: {"fp32": GFLOP/s, "bf16": GFLOP/s}."""
    return {"fp32": matmul_probe(device, torch.float32), "bf16": matmul_probe(device, torch.bfloat16)}


def _timed_matmul(a, b, device):
    _sync(device)
    t0 = time.perf_counter()
    a @ b
    _sync(device)
    return time.perf_counter() - t0


def peak_rows(result, peaks):
    """Each side's achieved GFLOP/s of the training step over the probe's matmul peak of its
    precision (ours: fp32 on a CPU, bf16 on CUDA; ours_bf16: bf16)."""
    train = result["train"]
    fractions = {}
    for name, precision in (("ours", "bf16" if result["ours_precision"] != "fp32" else "fp32"),
                            ("ours_bf16", "bf16")):
        if f"{name}_gflops" in train:
            fractions[f"{name}_peak_fraction"] = round(train[f"{name}_gflops"] / peaks[precision], 3)
    return fractions


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"


def _peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 989e12)


# -------------------------------------------------------------------- profile of a phase-2 step (issue 20)
# Op groups of the profile table, in print order. An op counts in the first group whose rule
# matches: inside a region that bench_profile marks (data, loss + mAP@k, optimiser) or by name.
PROFILE_GROUPS = ("matmul", "attention", "softmax/masks", "casts", "norms/activations",
                  "loss + mAP@k", "optimiser", "data", "other")
_BY_NAME = (("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
            ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
                        "aten::linear", "mkldnn_matmul", "mkldnn_linear")),
            ("loss + mAP@k", ("nll_loss", "kl_div", "topk")),   # their backward ops too
            ("softmax/masks", ("softmax", "masked_fill", "aten::where")),
            ("casts", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::type_as")),
            ("norms/activations", ("layer_norm", "gelu", "dropout", "bernoulli", "aten::random_",
                                   "random_bits", "tanh")))     # + dropout's random numbers
_REGIONS = ("data", "loss + mAP@k", "optimiser")     # record_function names (distill marks the loss)


def profile_group(name, regions):
    """The group of an op `name` whose enclosing record_function names are `regions`."""
    for region in _REGIONS:
        if region in regions:
            return region
    for group, keys in _BY_NAME:
        if any(name == k or (not k.startswith("aten::") and k in name) or
               (k.startswith("aten::") and name.startswith(k) and name[len(k):] in ("", "_"))
               for k in keys):
            return group
    return "other"


def profile_table(events, wall_ms, steps, device):
    """{group: ms per step} from the profiler's events: each op's self time (on CUDA its kernels'
    self device time) in its group; "other" also holds the rest of the wall time (Python between
    ops on a CPU; on CUDA the time the GPU waits), so the groups add up to the wall time."""
    cuda = device.type == "cuda"
    ms = dict.fromkeys(PROFILE_GROUPS, 0.0)
    for e in events:
        if cuda:
            t = getattr(e, "self_device_time_total", None)
            t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        else:
            t = e.self_cpu_time_total
        # the ops only: on CUDA each kernel (and each record_function's GPU span) is an event of its
        # own too, whose time its op's self_device_time_total holds already (counted twice)
        if not t or (getattr(e, "device_type", None) is not None and "CPU" not in str(e.device_type)):
            continue
        regions, parent = set(), e.cpu_parent
        while parent is not None:
            regions.add(parent.name)
            parent = parent.cpu_parent
        group = e.name if e.name in _REGIONS else profile_group(e.name, regions)
        ms[group] += t / 1e3
    ms["other"] += max(0.0, wall_ms - sum(ms.values()))
    return {g: v / steps for g, v in ms.items()}


def bench_profile(features, tokenizer, shape, device, precision, steps, batch_size, warmup=2):
    """torch.profiler over `steps` phase-2 steps of distill.py's code (row_passes, forward_backward,
    optimizer_step; --map-k mode) on the bench's stand-in model -> ({group: ms per step}, wall ms
    per step). The profiler's own cost per op inflates the small ops a little."""
    lengths = np.array([len(x) for x in features["input_ids"]])
    batches = [b for b in train_qa.length_grouped_batches(lengths, batch_size, 3, 0)
               if len(b) == batch_size]
    student = build_models(shape, tokenizer, device, "sdpa").train()
    teacher = distill.frozen_copy(student)
    optimizer = train_qa.make_optimizer(student, distill.LR, 0.0)
    scheduler = train_qa.make_scheduler(optimizer, 10 ** 6)
    opts = distill.StepOptions(map_k=True, t=2.0, precision=precision)
    multiple = train_qa.pad_multiple(device, precision, train_qa.MAX_LENGTH)       # as distill.py
    rf = torch.profiler.record_function

    def step(i):
        for rows, share in distill.row_passes([batches[i % len(batches)]], opts.alpha_rows, device):
            with rf("data"):
                batch = train_qa.collate(features, rows, tokenizer.pad_token_id, device,
                                         multiple=multiple)
            distill.forward_backward(student, teacher, batch, opts, share)
        with rf("optimiser"):
            distill.optimizer_step(student, optimizer, scheduler)

    for i in range(warmup):
        step(i)
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        _sync(device)
        wall = (time.perf_counter() - t0) * 1e3
    return profile_table(prof.events(), wall, steps, device), wall / steps


def print_profile(tables, file=None):
    """The profile tables side by side: ms per step and % of the step, one column pair each."""
    names = list(tables)
    print(f"{'op group':<20}" + "".join(f"{n + ' ms':>12}{'%':>7}" for n in names), file=file)
    for g in PROFILE_GROUPS + ("total",):
        row = f"{g:<20}"
        for n in names:
            total = sum(tables[n].values())
            v = total if g == "total" else tables[n][g]
            row += f"{v:>12.1f}{100 * v / total:>6.1f}%"
        print(row, file=file)


# -------------------------------------------------------------------- significance (issue 11)
MLQA_OTHER_LANGUAGES = (6, 0.44)  # an MLQA instance: English plus Binomial(6, 0.44) of the other
                                 # six (test: ~41k examples in the 7 same-language files over
                                 # ~11.6k instances, 3.6 languages each on average)


def significance_fixture(n_ids=11_600, seed=0):
    """An MLQA-test-sized comparison: every instance id has en and Binomial(6, 0.44) other
    languages, one example per (question, context) language pair of them over the 49 pairs (an
    instance with k languages is in k^2 pair files: ~170k examples in all, ~42k in the 7
    same-language files); short gold answers; models A and B right on about 55% of the examples,
    with an instance's difficulty shared by its pairs (they are correlated, as in MLQA), and
    agreeing on 80% of them."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(500)]
    gold, predictions = {}, {"a": {}, "b": {}}
    for i in range(n_ids):
        extra = rng.binomial(*MLQA_OTHER_LANGUAGES)
        langs = ["en"] + list(rng.choice(LANGUAGES[1:], size=extra, replace=False))
        answer = " ".join(rng.choice(words, size=rng.integers(1, 5)))
        easy = rng.beta(1.1, 0.9)                      # mean 0.55: the instance's difficulty
        for q in langs:
            for c in langs:
                ex = {"id": f"id{i}", "question": "?", "context": answer,
                      "answers": [{"text": answer, "answer_start": 0}]}
                gold.setdefault(f"{q}-{c}", []).append(ex)
                a_right = rng.random() < easy
                b_right = a_right if rng.random() < 0.8 else not a_right
                for side, right in (("a", a_right), ("b", b_right)):
                    predictions[side].setdefault(f"{q}-{c}", {})[ex["id"]] = \
                        answer if right else " ".join(rng.choice(words, size=2))
    gold = {"mlqa-test": {key: (exs, key.split("-")[1]) for key, exs in gold.items()}}
    return gold, {name: {"name": name, "predictions": {"mlqa-test": predictions[name]}}
                  for name in ("a", "b")}


def bench_significance(n_resamples, reps, n_ids=11_600):
    """Seconds of evaluate_mlqa.compare_two (per-example scoring of both models with the official
    rules, then the bootstrap of F1 and EM) on significance_fixture; the median of reps."""
    gold, runs = significance_fixture(n_ids)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = evaluate_mlqa.compare_two(runs["a"], runs["b"], gold, n_resamples, 0)
        times.append(time.perf_counter() - t0)
    gxlt = result["mlqa-test"]["f1"]["gxlt"]
    same = sum(len(gold["mlqa-test"][f"{l}-{l}"][0]) for l in LANGUAGES)
    return {"examples": gxlt["n"], "same_language_examples": same, "units": gxlt["units"],
            "pairs": len(gold["mlqa-test"]),
            "resamples": n_resamples, "seconds": round(statistics.median(times), 2),
            "gxlt_f1_diff": round(gxlt["diff"], 3), "ci": [round(x, 3) for x in gxlt["ci"]]}


# -------------------------------------------------------------------- main
def save_stand_in(out, shape, xquad_dir):
    """The bench's stand-in model (random weights) and tokenizer (BENCH_VOCAB pieces learnt from
    the texts of the main command's sample) as a model directory: distill.py end to end on it."""
    if os.path.exists(out):                      # never written over: it may be a user's model
        raise InputError(f"--save-model {out}: exists; name a new directory")
    check_writable(out, what="the stand-in model")  # before the tokenizer's minute of training
    examples = sample_cross_lingual(xquad_dir, ntl=5, seed=3)
    texts = sorted({text for ex in examples for text in (ex["question"], ex["context"])})
    tokenizer = train_qa.train_tiny_tokenizer(texts, vocab_size=BENCH_VOCAB)
    model = build_models(shape, tokenizer, torch.device("cpu"), "sdpa")
    with atomic_output_dir(out) as tmp:         # whole or not at all
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
    return len(tokenizer)


END_TO_END_EXAMPLES = 480   # the first 480 of the main command's sample: 23 steps of 24 rows
EPOCH_LINE = re.compile(r"^epoch 1/1: step \d+, loss \S+, ([0-9.]+)s", re.MULTILINE)


def bench_end_to_end(rounds, model_dir, precisions, max_examples, xquad_dir):
    """distill.py itself, in fresh processes: `rounds` rounds of one run per precision (their order
    alternating between rounds, against the machine's drift), one epoch on the first
    `max_examples` examples of the main command's sample. Each runs in an empty working directory,
    so that no MLQA dev data is found and the epoch's seconds (from its line) are training only."""
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-end-to-end-") as work:
        for i in range(rounds):
            row = {}
            for precision in precisions if i % 2 == 0 else precisions[::-1]:
                out = os.path.join(work, f"run-{i}-{precision}")
                cmd = [sys.executable, os.path.abspath(distill.__file__), "--model", model_dir,
                       "--max-examples", str(max_examples), "--epochs", "1",
                       "--precision", precision, "--xquad-dir", os.path.abspath(xquad_dir),
                       "--output-dir", out, "--keep-checkpoint", "none"]
                proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
                shutil.rmtree(out, ignore_errors=True)              # a temporary run of ours
                found = EPOCH_LINE.search(proc.stdout)
                if proc.returncode != 0 or not found:
                    last = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
                    raise InputError(f"--end-to-end: distill.py --precision {precision} ended with "
                                     f"status {proc.returncode}: {last}")
                row[precision] = float(found.group(1))
            if len(precisions) == 2:     # the second's speed over the first's (bf16 over fp32)
                row["speedup"] = round(row[precisions[0]] / row[precisions[1]], 3)
            print(f"round {i + 1}/{rounds}: " + ", ".join(f"{p} {row[p]:.1f} s" for p in precisions)
                  + (f"; {precisions[1]} {row['speedup']:.2f}x as fast as {precisions[0]}"
                     if "speedup" in row else ""), flush=True)
            times.append(row)
    result = {"rounds": times, "examples": max_examples, "model": model_dir,
              "median_s": {p: round(statistics.median(r[p] for r in times), 2) for p in precisions}}
    summary = ", ".join(f"{p} {result['median_s'][p]:.1f} s" for p in precisions)
    if len(precisions) == 2:
        speedups = [r["speedup"] for r in times]
        result.update(median_speedup=statistics.median(speedups), min_speedup=min(speedups),
                      max_speedup=max(speedups))
        summary += (f"; {precisions[1]} {result['median_speedup']:.2f}x as fast as "
                    f"{precisions[0]} ({result['min_speedup']:.2f}-{result['max_speedup']:.2f}x)")
    print(f"median of {rounds} round(s): {summary}", flush=True)
    return result


def matmul_ceiling(median_speedup, peaks):
    """bf16's end-to-end speed-up beside the device's own bound on it: the matmul probe's bf16 rate
    over its fp32 rate. A step is mostly matmuls, so bf16 cannot be much faster than its matmuls,
    and that ratio differs between CPUs (PERFORMANCE.md). The share says how much was reached."""
    matmul_speedup = peaks["bf16"] / peaks["fp32"]
    return {"matmul_peak_gflops": peaks, "matmul_speedup": round(matmul_speedup, 2),
            "share_of_matmul_speedup": round(median_speedup / matmul_speedup, 3)}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the tiny shape (unless --shape), few steps (CPU, minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps per repetition")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--batch-size", type=int, default=distill.BATCH_SIZE)
    p.add_argument("--eval-examples", type=int, default=None)
    p.add_argument("--xquad-dir", default=XQUAD_DIR)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=train_qa.PRECISIONS, default="auto",
                   help="bf16: on a CPU, time ours in fp32 and under bf16 autocast (CUDA: always bf16)")
    p.add_argument("--significance", action="store_true",
                   help="time the paired bootstrap of two models at MLQA-test size instead")
    p.add_argument("--compile", action="store_true",
                   help="training rows of ours compiled too (distill.py --compile), and the ratio")
    p.add_argument("--profile", action="store_true",
                   help="instead: torch.profiler over --steps (default 4) phase-2 steps, a table of "
                        "op groups; in fp32 and bf16 on a CPU unless --precision names one")
    p.add_argument("--save-model", metavar="DIR", default=None,
                   help="instead: save the --shape model (default small; random weights) and the "
                        "bench's 30k-piece tokenizer to a new DIR, to time distill.py --model DIR")
    p.add_argument("--end-to-end", metavar="ROUNDS", type=int, default=None,
                   help="instead: time distill.py itself, one epoch in fresh processes, in fp32 "
                        "and bf16 (or the --precision named) per round; the epoch's seconds, "
                        "the ratio per round and the median")
    p.add_argument("--model", default=None,
                   help="--end-to-end: a model directory (default: the --shape stand-in, default "
                        "small, saved to a temporary directory first, about a minute)")
    p.add_argument("--max-examples", type=int, default=END_TO_END_EXAMPLES,
                   help="--end-to-end: distill.py --max-examples")
    args = p.parse_args(argv)
    for name in ("steps", "reps", "batch_size", "eval_examples", "end_to_end", "max_examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.save_model:
        pieces = save_stand_in(args.save_model, args.shape or "small", args.xquad_dir)
        print(f"saved the {args.shape or 'small'} stand-in ({pieces} pieces, random weights) to "
              f"{args.save_model}; time e.g.: python distill.py --model {args.save_model} "
              f"--max-examples 480 --epochs 1 --precision bf16")
        return
    if args.end_to_end:
        if args.device is not None:
            p.error("--device: --end-to-end times distill.py on the device it picks itself")
        if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
            raise InputError(f"--model {args.model}: not a model directory (no config.json)")
        precisions = ["fp32", "bf16"] if args.precision == "auto" else [args.precision]
        device = train_qa.default_device(None)
        if "bf16" in precisions:
            train_qa.note_slow_bf16("bf16", device.type)
        peaks = None
        if precisions == ["fp32", "bf16"]:      # probed first, on the idle device
            peaks = matmul_peaks(device)
            print(f"matmul probe: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} "
                  f"GFLOP/s (bf16 {peaks['bf16'] / peaks['fp32']:.2f}x)", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-stand-in-") as tmp:
            model_dir = os.path.abspath(args.model) if args.model else os.path.join(tmp, "model")
            if not args.model:
                save_stand_in(model_dir, args.shape or "small", args.xquad_dir)
            result = bench_end_to_end(args.end_to_end, model_dir, precisions, args.max_examples,
                                      args.xquad_dir)
        result.update(model=args.model or f"the {args.shape or 'small'} stand-in",
                      device=_device_name(device))
        if peaks:
            result.update(matmul_ceiling(result["median_speedup"], peaks))
            print(f"bf16's median speed-up is {result['share_of_matmul_speedup']:.0%} of its "
                  f"matmuls' ({result['matmul_speedup']:.2f}x on this device)", flush=True)
        if args.json:
            print(json.dumps({"end_to_end": result}))
        return
    if args.significance:
        result = {"significance": bench_significance(10_000, args.reps or 3)}
        print(json.dumps(result))
        return
    device = train_qa.default_device(args.device)
    if device.type == "cuda" and args.precision == "fp32":
        raise InputError("--precision fp32: on CUDA ours runs distill.py's bf16 autocast; fp32 "
                         "rows are a CPU comparison")
    bf16 = args.precision == "bf16" and device.type == "cpu"    # CUDA's default is bf16 already
    train_qa.note_slow_bf16(args.precision, device.type)
    # --quick / CPU: the project's own CPU model (--model tiny); GPU: the real mBERT-base shape
    shape = args.shape or ("tiny" if args.quick or device.type == "cpu" else "mbert-base")
    steps = args.steps or (4 if args.profile else 8 if args.quick else 20)
    reps = 1 if args.profile else args.reps or 5
    n_eval = 0 if args.profile else args.eval_examples or (300 if args.quick else 2000)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")         # TF32 outside autocast, as distill.py

    examples = sample_cross_lingual(args.xquad_dir, ntl=5, seed=3)   # the main command's sample
    rng = np.random.default_rng(0)
    n_train = (2 + steps * reps) * args.batch_size
    train_examples = [examples[i] for i in rng.permutation(len(examples))[:n_train]]
    eval_examples = [examples[i] for i in rng.permutation(len(examples))[:n_eval]]
    texts = [x for ex in train_examples + eval_examples for x in (ex["question"], ex["context"])]
    # 30k pieces: window lengths close to mBERT's on XQuAD (the tiny model's 8k splits words more)
    tokenizer = train_qa.train_tiny_tokenizer(texts, vocab_size=BENCH_VOCAB)
    train_features = train_qa.build_features(train_examples, tokenizer)
    eval_features = train_qa.build_features(eval_examples, tokenizer, train=False) if n_eval else None
    if args.profile:            # the precisions to profile: CPU auto = both fp32 and bf16
        precisions = [args.precision] if args.precision != "auto" else \
            ["auto"] if device.type == "cuda" else ["fp32", "bf16"]
        print(f"profile: device {_device_name(device)}, shape {shape}, {steps} steps of batch "
              f"{args.batch_size} (ms per step)")
        tables, wall = {}, {}
        for precision in precisions:
            train_qa.set_matmul_precision(precision, device)
            name = "bf16" if precision == "auto" else precision
            tables[name], wall[name] = bench_profile(train_features, tokenizer, shape, device,
                                                     precision, steps, args.batch_size)
        print_profile(tables)
        if args.json:
            print(json.dumps({"profile": tables, "wall_ms": wall, "device": _device_name(device),
                              "shape": shape}))
        return
    print(f"device {device}, shape {shape} {SHAPES[shape]}; train: {steps} steps x {reps} reps of "
          f"batch {args.batch_size}; eval: {len(eval_features['input_ids'])} windows x {reps} reps",
          file=sys.stderr)

    peaks = matmul_peaks(device)
    print(f"matmul probe: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s",
          file=sys.stderr)
    result = {"matmul_peak_gflops": peaks,
              "train": bench_train(train_features, tokenizer, shape, device, steps, reps, 2,
                                   args.batch_size, bf16, args.compile),
              "eval": bench_eval(eval_examples, eval_features, tokenizer, shape, device, reps, bf16),
              "device": _device_name(device),
              "shape": shape, "ours_precision": "bf16 autocast" if device.type == "cuda" else "fp32"}
    result["train"].update(peak_rows(result, peaks))
    for part in ("train", "eval"):
        r = result[part]
        print(f"{part}: ours {r['ours_fps']:.1f} windows/s ({result['ours_precision']}), reference "
              f"{r['reference_fps']:.1f} windows/s, speedup {r['speedup']:.2f}x" +
              (f", MFU {r['ours_mfu']:.1%}" if "ours_mfu" in r else "") +
              (f", peak memory {r['ours_peak_mem_gib']} GiB" if "ours_peak_mem_gib" in r else ""),
              file=sys.stderr if args.json else sys.stdout)
        if part == "train":
            print(f"train: ours reaches {r['ours_gflops']:.0f} GFLOP/s = "
                  f"{r['ours_peak_fraction']:.0%} of the matmul probe" +
                  (f"; under bf16 autocast {r['ours_bf16_gflops']:.0f} GFLOP/s = "
                   f"{r['ours_bf16_peak_fraction']:.0%} of bf16's" if "ours_bf16_gflops" in r else ""),
                  file=sys.stderr if args.json else sys.stdout)
        for name in ("ours", "ours_bf16"):
            if f"{name}_compiled_fps" in r:
                print(f"{part}: {name} compiled {r[name + '_compiled_fps']:.1f} windows/s, "
                      f"{r[name + '_compiled_over_eager']:.2f}x eager",
                      file=sys.stderr if args.json else sys.stdout)
        if "ours_bf16_fps" in r:
            print(f"{part}: ours under bf16 autocast {r['ours_bf16_fps']:.1f} windows/s, "
                  f"{r['bf16_over_fp32']:.2f}x fp32, {r['bf16_speedup']:.2f}x the reference",
                  file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
