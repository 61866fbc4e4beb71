"""Dropout for training on a CPU: torch's distribution, drawn faster, and attention kept in bf16.

Two costs of dropout on a CPU that a GPU does not have (issue 20; measured on the 2-core CPUs of
this project, the bench's small shape, a bf16 phase-2 step):
  * torch's CPU dropout draws one double-precision uniform per element, on one thread (6-8 ns per
    element): ~20% of the step;
  * scaled_dot_product_attention with dropout cannot use the fused CPU kernel and takes PyTorch's
    math path, which runs bf16 attention in fp32 (its matmuls at a quarter of bf16's speed).
Here an element is dropped when 32 random bits lie below a threshold: dropped with probability p
(to 2^-32), kept values scaled by 1 / (1 - p), which is torch's dropout. The bits come two per
64-bit draw of numpy SFC64 generators seeded from torch's default one (so seeds, checkpoints and
exact resume work as before), one per fixed-size chunk, the chunks drawn on all of torch's threads.
The random stream differs from torch's, so a CPU run's numbers differ from one without this.
Attention with dropout is written out, so that under --precision bf16 it runs in bf16 (the
softmax accumulating in fp32), not in the math path's fp32; under bf16 autocast attention without
dropout (the teacher, evaluation) is written out too, since the fused CPU kernel is no faster in
bf16 than in fp32 (its scores are then rounded to bf16, as transformers' eager attention's). Masks
are added and multiplied, not applied with masked_fill or converted from bool (3-5x slower than a
multiply on a CPU).

    with cpu_dropout.cpu_ops(model, device):   # train_qa.qa_logits, inside its autocast
        out = model(**inputs)

Any model whose dropout goes through F.dropout (nn.Dropout) and F.scaled_dot_product_attention is
covered; anything else (CUDA, an fp32 forward in eval mode, a causal or grouped-query attention)
runs torch's own.
"""
import contextlib
from concurrent.futures import ThreadPoolExecutor

import common  # noqa: F401 (first: OpenMP's wait policy before torch loads it)
import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from common import not_a_script


DRAWS_PER_CHUNK = 1 << 18   # 2 MB of draws per generator; fixed: the bits do not depend on threads
_pool = None                # the threads that draw the chunks, made at the first multi-chunk draw


def _in_chunks(n, fill):
    """Calls fill(lo, hi, bits) for each chunk [lo, hi) of n 32-bit values, bits = the chunk's
    values (numpy int32, uniform): two per 64-bit draw of a numpy SFC64 generator per chunk of
    DRAWS_PER_CHUNK draws, each seeded from torch's default CPU generator (so torch.manual_seed
    and a checkpoint's RNG state decide them all), the chunks on torch's threads at once. (SFC64
    draws 2-3x as fast as torch's mt19937 here; numpy releases the GIL while it works.)"""
    global _pool
    per_chunk = 2 * DRAWS_PER_CHUNK
    starts = range(0, n, per_chunk)
    seeds = torch.empty(len(starts), dtype=torch.int64).random_().tolist()     # 0 <= seed < 2^63

    def draw(lo, seed):
        hi = min(lo + per_chunk, n)
        fill(lo, hi, np.random.SFC64(seed).random_raw((hi - lo + 1) // 2).view(np.int32)[:hi - lo])

    with torch.profiler.record_function("cpu_dropout.random_bits"):   # bench.py --profile
        if len(starts) == 1:
            draw(starts[0], seeds[0])
        else:
            _pool = _pool or ThreadPoolExecutor(torch.get_num_threads())
            list(_pool.map(draw, starts, seeds))


def random_bits(n):
    """n uniform 32-bit integers (int32 tensor): _in_chunks' values, in order."""
    bits = torch.empty(n, dtype=torch.int32)
    out = bits.numpy()

    def fill(lo, hi, chunk):
        out[lo:hi] = chunk
    _in_chunks(n, fill)
    return bits


def keep_mask(shape, p, dtype):
    """1 where dropout keeps an element of a tensor of `shape` (probability 1 - p, to 2^-32), else
    0, in `dtype`: random_bits(n) >= threshold, made chunk by chunk on the threads that draw the
    bits, while they are in cache (one pass over the mask in memory, not four)."""
    mask = torch.empty(shape, dtype=dtype)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    out = mask.view(-1).view(as_int).numpy()                  # the mask's bytes, as integers
    one = np.array(torch.ones((), dtype=dtype).view(as_int).item(), dtype=out.dtype)  # 1.0's bits
    threshold = -2 ** 31 + round(p * 2 ** 32)                 # P(bits < threshold) = p

    def fill(lo, hi, bits):
        np.multiply(bits >= threshold, one, out=out[lo:hi])   # 0 or 1.0, as their bits
    _in_chunks(mask.numel(), fill)
    return mask


def dropout(x, p, rescale=True):
    """F.dropout(x, p, training=True) with keep_mask's random numbers. The kept values are scaled
    by 1 / (1 - p) as a Python float (computed in fp32 for a bf16 x, then rounded once; torch's
    own bf16 dropout multiplies by 1 / (1 - p) rounded to bf16: 1.109 for 1.111). rescale=False
    leaves that factor to the caller."""
    dropped = x * keep_mask(x.shape, p, x.dtype)
    return dropped.mul_(1.0 / (1.0 - p)) if rescale else dropped


def attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=None):
    """F.scaled_dot_product_attention (not causal, same head count) with dropout() on the
    probabilities. attn_mask: None, bool (True = attend) or additive float, broadcast to the
    scores. Under bf16 autocast the scores and probabilities stay bf16, L x L per head, as in
    transformers' eager attention (a fused GPU kernel keeps the scores in fp32): the softmax
    accumulates in fp32 and rounds once, to the bf16 the second matmul takes. In fp32 mode
    everything is fp32. Dropout's 1 / (1 - p) multiplies the output, L x head_dim per head, not the
    L x L probabilities: the same product, on a smaller tensor."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query * scale, key.transpose(-2, -1))
    lowest = torch.finfo(scores.dtype).min
    if attn_mask is not None and attn_mask.dtype == torch.bool:   # added: masked_fill is slower
        bias = (~attn_mask).view(torch.uint8).to(scores.dtype) * lowest
    elif attn_mask is not None:     # fp32's lowest value would round to -inf in bf16
        bias = attn_mask.clamp_min(lowest).to(scores.dtype)
    if attn_mask is not None:   # in place: the matmul's backward keeps its inputs, not its output
        scores.add_(bias)
    probs = torch.softmax(scores, dim=-1)       # CPU autocast leaves it in bf16, fp32 inside
    if not dropout_p > 0:
        return torch.matmul(probs, value)
    out = torch.matmul(dropout(probs, dropout_p, rescale=False), value)
    return out.mul_(1.0 / (1.0 - dropout_p))


def _arg(args, kwargs, index, name, default):
    return kwargs[name] if name in kwargs else args[index] if len(args) > index else default


class CpuDropout(TorchFunctionMode):
    """Routes a CPU forward's F.dropout (training, 0 < p < 1, not in place) to dropout() and its
    F.scaled_dot_product_attention with dropout or in bf16 to attention(); every other call runs
    as it is. (Inside __torch_function__ the mode is off, so the replacements' own ops run plainly.)
    bf16 without dropout too (the teacher, evaluation): the fused CPU kernel ran no faster in bf16
    than in fp32, attention() 2-2.5x as fast (AMD EPYC, [12, 4, L, 64], L = 160-384)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p = args[0], _arg(args, kwargs, 1, "p", 0.5)
            if (_arg(args, kwargs, 2, "training", True) and not _arg(args, kwargs, 3, "inplace", False)
                    and 0 < p < 1 and x.device.type == "cpu"):
                return dropout(x, p)
        elif func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]
            dropout_p = _arg(args, kwargs, 4, "dropout_p", 0.0)
            if ((0 < dropout_p < 1 or query.dtype == torch.bfloat16) and query.device.type == "cpu"
                    and not _arg(args, kwargs, 5, "is_causal", False)
                    and not kwargs.get("enable_gqa", False) and query.dim() == 4
                    and query.shape[1] == key.shape[1]):
                return attention(*args[:3], attn_mask=_arg(args, kwargs, 3, "attn_mask", None),
                                 dropout_p=dropout_p, scale=_arg(args, kwargs, 6, "scale", None))
        return func(*args, **kwargs)


def cpu_ops(model, device):
    """CpuDropout while `model` runs eagerly on a CPU and trains or runs under bf16 autocast (call
    it inside the autocast); nothing otherwise (CUDA's dropout and attention are fused, a
    --compile'd forward fuses its own: Module.compile sets _compiled_call_impl; an fp32 forward
    without dropout keeps the fused kernel, faster in fp32)."""
    eager = getattr(model, "_compiled_call_impl", None) is None
    bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    wanted = eager and (getattr(model, "training", False) or bf16)
    return CpuDropout() if wanted and torch.device(device).type == "cpu" else contextlib.nullcontext()


if __name__ == "__main__":
    not_a_script(__file__)
