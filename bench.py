"""Benchmark: phase-2 training and evaluation throughput against the authors' configuration.

    python bench.py --quick --json                # CPU, small shape, a few minutes; last line = JSON
    python bench.py --shape mbert-base            # the real mBERT-base dimensions (GPU), random weights
    python bench.py --shape mbert-base --json --steps 20 --reps 5

Both sides run on the same cross-lingual XQuAD sample (sample.py, ntl=5, seed=3), the same model
shape and the same random weights, in one process:

  ours       distill.py's real training step (distill.forward_backward + distill.optimizer_step:
             length-grouped batches padded to their longest window, SDPA attention, Eq. 1's
             softmax over allowed positions, vectorised mAP@k, bf16 autocast and fused AdamW on
             CUDA, the teacher a persistent module synced by load_state_dict) and train_qa.predict's
             inference + vectorised answer extraction (as evaluate_mlqa.py runs it).
  reference  the configuration of the authors' scripts, implemented faithfully here: every window
             padded to 384, fp32 (no TF32), eager attention, softmax/KL over all 384 positions,
             mAP@k and answer extraction in Python loops, the teacher deep-copied each generation,
             unfused AdamW.

Throughput is windows ("features") per second; warm-up steps are excluded; each side is timed over
several repetitions and the median is reported. On CUDA, MFU (model FLOPs of the real, unpadded
tokens over the GPU's dense bf16 peak) and peak memory are reported too.
"""
import copy
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import distill
import train_qa
from common import ArgumentParser, run_main
from map_at_k import map_at_k
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


# -------------------------------------------------------------------- the reference configuration
@torch.no_grad()
def reference_map_at_k(start_logits, end_logits, start_positions, end_positions, k=10, delta=5):
    """Eq. 5 as the authors compute it: Python loops over examples and ranks (paper variant)."""
    alphas = []
    for logits, gold in ((start_logits, start_positions), (end_logits, end_positions)):
        aps = []
        for row, g in zip(logits.tolist(), gold.tolist()):
            top = sorted(range(len(row)), key=lambda j: -row[j])[:k]
            hits, ap = 0, 0.0
            for r, j in enumerate(top, 1):
                if g - delta <= j < g + delta:
                    hits += 1
                    ap += hits / r
            aps.append(ap / min(k, 2 * delta))
        alphas.append(sum(aps) / len(aps))
    return sum(alphas) / 2


def reference_step(student, teacher, batch, optimizer, t=2.0):
    """One step of the authors' configuration: full-length windows, softmax over all positions."""
    inputs = dict(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                  attention_mask=batch["attention_mask"])
    with torch.no_grad():
        teacher_out = teacher(**inputs)
    alpha = reference_map_at_k(teacher_out.start_logits, teacher_out.end_logits,
                               batch["start_positions"], batch["end_positions"])
    out = student(**inputs)
    ce = (F.cross_entropy(out.start_logits, batch["start_positions"]) +
          F.cross_entropy(out.end_logits, batch["end_positions"])) / 2
    kl = sum(F.kl_div(F.log_softmax(s / t, -1), F.softmax(te / t, -1), reduction="batchmean")
             for s, te in ((out.start_logits, teacher_out.start_logits),
                           (out.end_logits, teacher_out.end_logits))) / 2 * t * t
    loss = ce + alpha * kl
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), train_qa.MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def reference_extract(start_logits, end_logits, offsets, context_mask, n_best=train_qa.N_BEST,
                      max_answer_tokens=train_qa.MAX_ANSWER_TOKENS):
    """The usual post-processing loop: per window, the n_best starts x ends checked one by one."""
    best = []
    for f in range(len(start_logits)):
        s_log, e_log = start_logits[f], end_logits[f]
        top_s = np.argsort(s_log)[-1:-n_best - 1:-1]
        top_e = np.argsort(e_log)[-1:-n_best - 1:-1]
        cand = (-np.inf, 0, 0)
        for s in top_s:
            for e in top_e:
                if s >= len(offsets[f]) or e >= len(offsets[f]) or not context_mask[f][s] \
                        or not context_mask[f][e] or e < s or e - s + 1 > max_answer_tokens:
                    continue
                if s_log[s] + e_log[e] > cand[0]:
                    cand = (s_log[s] + e_log[e], offsets[f][s][0], offsets[f][e][1])
        best.append(cand)
    return best


def reference_predict(model, features, examples, batch_size, device):
    """Authors' evaluation: windows padded to 384, fp32, Python-loop extraction, best per example."""
    best = {}
    n = len(features["input_ids"])
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(n, lo + batch_size))
            batch = collate_full(features, idx, device)
            out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                        attention_mask=batch["attention_mask"])
            ctx = [np.pad(features["allowed"][i], (0, train_qa.MAX_LENGTH - len(features["allowed"][i])))
                   for i in idx]
            ctx = [np.concatenate([[False], c[1:]]) for c in ctx]          # [CLS] is not an answer
            spans = reference_extract(out.start_logits.float().cpu().numpy(),
                                      out.end_logits.float().cpu().numpy(),
                                      [features["offsets"][i] for i in idx], ctx)
            for i, (score, a, b) in zip(idx, spans):
                ex = features["example_index"][i]
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, a, b)
    return {examples[ex]["id"]: examples[ex]["context"][a:b] for ex, (_, a, b) in best.items()}


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


def timed(fn, reps, device):
    """Run fn() `reps` times; seconds per repetition."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def bench_train(features, tokenizer, shape, device, steps, reps, warmup, batch_size):
    lengths = np.array([len(x) for x in features["input_ids"]])
    need = (warmup + steps * reps) * batch_size
    batches = [b for e in range(math.ceil(need / len(lengths)) + 1)
               for b in train_qa.length_grouped_batches(lengths, batch_size, 3, e)
               if len(b) == batch_size]
    results = {}

    # ours: distill.py's code path, --map-k mode
    student = build_models(shape, tokenizer, device, "sdpa").train()
    teacher = build_models(shape, tokenizer, device, "sdpa").eval().requires_grad_(False)
    optimizer = train_qa.make_optimizer(student, distill.LR, 0.0)
    scheduler = train_qa.make_scheduler(optimizer, 10 ** 6)
    it = iter(batches)
    opts = distill.StepOptions(mode="skd-map", t=2.0, k=10, delta=5, map_variant="paper")

    def ours(n):
        def run():
            teacher.load_state_dict(student.state_dict())          # one generation sync per rep
            for _ in range(n):
                batch = train_qa.collate(features, next(it), tokenizer.pad_token_id, device)
                distill.forward_backward(student, teacher, batch, opts)
                distill.optimizer_step(student, optimizer, scheduler)
        return run
    ours(warmup)()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ours = timed(ours(steps), reps, device)
    tokens = sum(int(lengths[b].sum()) for b in batches[warmup:warmup + steps * reps])
    results["ours"] = dict(times=t_ours, mem=_peak_mem(device),
                           tokens_per_rep=tokens / reps)
    flops_tok = model_flops_per_token(student, int(lengths.mean()))
    del student, teacher, optimizer

    # reference: padded to 384, fp32, eager attention, Python-loop mAP@k, deep-copied teacher
    student = build_models(shape, tokenizer, device, "eager").train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=distill.LR, fused=False, foreach=False)
    it = iter(batches)

    def reference(n):
        def run():
            teacher = copy.deepcopy(student).eval()                # the authors' generation sync
            for _ in range(n):
                reference_step(student, teacher, collate_full(features, next(it), device), optimizer)
        return run
    with fp32_matmul():
        reference(warmup)()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results["reference"] = dict(times=timed(reference(steps), reps, device), mem=_peak_mem(device))
    del student, optimizer
    feats = steps * batch_size
    ours_fps = feats / statistics.median(results["ours"]["times"])
    ref_fps = feats / statistics.median(results["reference"]["times"])
    out = dict(ours_fps=round(ours_fps, 2), reference_fps=round(ref_fps, 2),
               speedup=round(ours_fps / ref_fps, 2))
    if device.type == "cuda":
        # teacher forward (1x) + student forward and backward (3x) = 4 forward passes per token
        tok_per_s = results["ours"]["tokens_per_rep"] / statistics.median(results["ours"]["times"])
        out.update(ours_mfu=round(4 * flops_tok * tok_per_s / _peak_flops(device), 4),
                   ours_peak_mem_gib=results["ours"]["mem"],
                   reference_peak_mem_gib=results["reference"]["mem"])
    return out


def bench_eval(examples, features, tokenizer, shape, device, reps, batch_size):
    model = build_models(shape, tokenizer, device, "sdpa").eval()
    n = len(features["input_ids"])
    ours = lambda: train_qa.predict(model, tokenizer, examples, batch_size=batch_size,  # noqa: E731
                                    device=device, features=features)
    ours()                                                           # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ours = timed(ours, reps, device)
    mem_ours = _peak_mem(device)
    ref_model = build_models(shape, tokenizer, device, "eager").eval()
    ref_model.load_state_dict(model.state_dict())
    with fp32_matmul():
        reference = lambda: reference_predict(ref_model, features, examples, batch_size, device)  # noqa: E731
        agree = _agreement(ours(), reference(), examples)                # also the warm-up
        t_ref = timed(reference, reps, device)
    ours_fps, ref_fps = n / statistics.median(t_ours), n / statistics.median(t_ref)
    out = dict(ours_fps=round(ours_fps, 2), reference_fps=round(ref_fps, 2),
               speedup=round(ours_fps / ref_fps, 2), same_answers=agree)
    if device.type == "cuda":
        out["ours_peak_mem_gib"] = mem_ours
    return out


def _agreement(a, b, examples):
    """Share of examples where both pipelines return the same answer text (bf16 on CUDA may differ)."""
    return round(sum(a[ex["id"]] == b.get(ex["id"], "") for ex in examples) / len(examples), 4)


class fp32_matmul:
    """The reference runs in true fp32 (no TF32) on CUDA."""
    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


def _peak_mem(device):
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None


def _peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 989e12)


# -------------------------------------------------------------------- main
def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape, few steps (CPU, minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps per repetition")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--batch-size", type=int, default=distill.BATCH_SIZE)
    p.add_argument("--eval-examples", type=int, default=None)
    p.add_argument("--xquad-dir", default="data/xquad")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = args.shape or ("small" if args.quick or device.type == "cpu" else "mbert-base")
    steps = args.steps or (4 if args.quick else 20)
    reps = args.reps or (3 if args.quick else 5)
    n_eval = args.eval_examples or (300 if args.quick else 2000)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    examples = sample_cross_lingual(args.xquad_dir, ntl=5, seed=3)   # the main command's sample
    rng = np.random.default_rng(0)
    n_train = (2 + steps * reps) * args.batch_size
    train_examples = [examples[i] for i in rng.permutation(len(examples))[:n_train]]
    eval_examples = [examples[i] for i in rng.permutation(len(examples))[:n_eval]]
    texts = [x for ex in train_examples + eval_examples for x in (ex["question"], ex["context"])]
    # 30k pieces: window lengths close to mBERT's on XQuAD (the tiny model's 8k splits words more)
    tokenizer = train_qa.train_tiny_tokenizer(texts, vocab_size=BENCH_VOCAB)
    train_features = train_qa.build_features(train_examples, tokenizer)
    eval_features = train_qa.build_features(eval_examples, tokenizer, train=False)
    print(f"device {device}, shape {shape} {SHAPES[shape]}; train: {steps} steps x {reps} reps of "
          f"batch {args.batch_size}; eval: {len(eval_features['input_ids'])} windows x {reps} reps",
          file=sys.stderr)

    result = {"train": bench_train(train_features, tokenizer, shape, device, steps, reps, 2,
                                   args.batch_size),
              "eval": bench_eval(eval_examples, eval_features, tokenizer, shape, device, reps, 64),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)",
              "shape": shape}
    for part in ("train", "eval"):
        r = result[part]
        print(f"{part}: ours {r['ours_fps']:.1f} windows/s, reference {r['reference_fps']:.1f} "
              f"windows/s, speedup {r['speedup']:.2f}x" +
              (f", MFU {r['ours_mfu']:.1%}" if "ours_mfu" in r else "") +
              (f", peak memory {r['ours_peak_mem_gib']} GiB" if "ours_peak_mem_gib" in r else ""),
              file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
