"""Dropout for training on a CPU: torch's distribution, drawn faster, and attention kept in bf16.

Two costs of dropout on a CPU that a GPU does not have (issue 20; measured on the 2-core CPUs of
this project, the bench's small shape, a bf16 phase-2 step):
  * torch's CPU dropout draws one double-precision uniform per element, on one thread (6-8 ns per
    element): ~20% of the step;
  * scaled_dot_product_attention with dropout cannot use the fused CPU kernel and takes PyTorch's
    math path, which runs bf16 attention in fp32 (its matmuls at a quarter of bf16's speed).
Here an element is dropped when its 32 random bits, read as an unsigned number, lie below
round(p * 2^32): dropped with probability p (to 2^-32), kept values scaled by 1 / (1 - p), which
is torch's dropout. The top 8 of the 32 bits decide all elements but those whose top byte equals
the threshold's (1 in 256); only those draw their other 24 bits. So eight elements share one
64-bit draw of numpy SFC64 generators seeded from torch's default one (so seeds, checkpoints and
exact resume work as before), one generator per fixed-size chunk of the elements, the chunks drawn
on all of torch's threads. The random stream differs from torch's, so a CPU run's numbers differ
from one without this.
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


CHUNK = 1 << 18     # elements per generator (32K draws); fixed: the masks do not depend on threads
_pool = None        # the threads that draw the chunks, made at the first multi-chunk draw


def _in_chunks(n, fill):
    """Calls fill(lo, hi, generator) for each chunk [lo, hi) of n elements, with a numpy SFC64
    generator of its own per chunk of CHUNK elements, each seeded from torch's default CPU
    generator (so torch.manual_seed and a checkpoint's RNG state decide them all), the chunks on
    torch's threads at once. (SFC64 draws 2-3x as fast as torch's mt19937 here; numpy releases the
    GIL while it works.)"""
    global _pool
    starts = range(0, n, CHUNK)
    seeds = torch.empty(len(starts), dtype=torch.int64).random_().tolist()     # 0 <= seed < 2^63

    def draw(lo, seed):
        fill(lo, min(lo + CHUNK, n), np.random.SFC64(seed))

    with torch.profiler.record_function("cpu_dropout.random_bits"):   # bench.py --profile
        if len(starts) == 1:
            draw(starts[0], seeds[0])
        else:
            _pool = _pool or ThreadPoolExecutor(torch.get_num_threads())
            list(_pool.map(draw, starts, seeds))


def keep_mask(shape, p, dtype):
    """1 where dropout keeps an element of a tensor of `shape`, else 0, in `dtype`. An element is
    kept when its 32 random bits u (unsigned) are >= threshold = round(p * 2^32): dropped with
    probability threshold / 2^32, p to 2^-32. u's top byte decides unless it equals the
    threshold's top byte (1 element in 256); only then are u's other 24 bits drawn. Top bytes come
    eight per 64-bit draw of the chunk's generator, the tied elements' 24 bits after them, one
    draw each. Made chunk by chunk on the threads that draw the bits, while they are in cache (one
    pass over the mask in memory)."""
    mask = torch.empty(shape, dtype=dtype)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    out = mask.view(-1).view(as_int).numpy()                  # the mask's bytes, as integers
    one = np.array(torch.ones((), dtype=dtype).view(as_int).item(), dtype=out.dtype)  # 1.0's bits
    threshold = min(round(p * 2 ** 32), 2 ** 32 - 1)          # P(u < threshold) = p, to 2^-32
    top, low = np.uint8(threshold >> 24), threshold & 0xFFFFFF

    def fill(lo, hi, generator):
        top_bytes = generator.random_raw(-(-(hi - lo) // 8)).view(np.uint8)[:hi - lo]
        kept = top_bytes > top
        tied = np.flatnonzero(top_bytes == top)
        kept[tied] = (generator.random_raw(len(tied)) & 0xFFFFFF) >= low   # their other 24 bits
        np.multiply(kept, one, out=out[lo:hi])                # 0 or 1.0, as their bits
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
