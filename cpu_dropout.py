"""Dropout for training on a CPU: torch's distribution, drawn faster, and attention kept in bf16.

Two costs of dropout on a CPU that a GPU does not have (issue 20; measured on the 2-core AMD EPYC,
the bench's small shape, a bf16 phase-2 step):
  * torch's CPU dropout draws one double-precision uniform per element, on one thread (6-8 ns per
    element): ~20% of the step;
  * scaled_dot_product_attention with dropout cannot use the fused CPU kernel and takes PyTorch's
    math path, which runs bf16 attention in fp32 (its matmuls at a quarter of bf16's speed).
Here an element is kept when 32 random bits (two elements per 64-bit draw of torch's own CPU
generator, so seeds, checkpoints and exact resume work as before) lie above a threshold: kept with
probability 1 - p (to 2^-32), kept values scaled by 1 / (1 - p), which is torch's dropout. The
random stream differs from torch's, so a CPU run's numbers differ from one without this.
Attention with dropout is written out, so that under --precision bf16 it runs in bf16 (the
softmax accumulating in fp32), not in the math path's fp32.

    with cpu_dropout.training_ops(model, device):   # train_qa.qa_logits, a training forward
        out = model(**inputs)

Any model whose dropout goes through F.dropout (nn.Dropout) and F.scaled_dot_product_attention is
covered; anything else (CUDA, eval mode, a causal or grouped-query attention) runs torch's own.
"""
import contextlib
import math

import common  # noqa: F401 (first: OpenMP's wait policy before torch loads it)
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from common import not_a_script


def keep_mask(shape, p, dtype, device="cpu"):
    """The dropout multiplier of a tensor of `shape`: 1 / (1 - p) with probability 1 - p, else 0."""
    n = math.prod(shape)
    draws = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    bits = draws.view(torch.int32)[:n].view(shape)      # uniform on [-2^31, 2^31)
    drop_below = -2 ** 31 + round(p * 2 ** 32)           # P(bits < drop_below) = p
    return (bits >= drop_below).to(dtype).mul_(1.0 / (1.0 - p))


def dropout(x, p):
    """F.dropout(x, p, training=True) with keep_mask's random numbers."""
    return x * keep_mask(x.shape, p, x.dtype, x.device)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=None):
    """F.scaled_dot_product_attention (not causal, same head count) with dropout() on the
    probabilities. attn_mask: None, bool (True = attend) or additive float, broadcast to the
    scores. Under bf16 autocast the first matmul rounds the scores to bf16 (as transformers'
    eager attention under autocast; a fused GPU kernel keeps them in fp32), the softmax
    accumulates in fp32 and the probabilities enter the second matmul in bf16; in fp32 mode
    everything is fp32."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query * scale, key.transpose(-2, -1))
    lowest = torch.finfo(scores.dtype).min
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, lowest)
    elif attn_mask is not None:     # fp32's lowest value would round to -inf in bf16
        scores = scores + attn_mask.clamp_min(lowest).to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(dropout(probs, dropout_p) if dropout_p > 0 else probs, value)


def _arg(args, kwargs, index, name, default):
    return kwargs[name] if name in kwargs else args[index] if len(args) > index else default


class CpuDropout(TorchFunctionMode):
    """Routes a CPU forward's F.dropout (training, 0 < p < 1, not in place) to dropout() and its
    F.scaled_dot_product_attention with dropout to attention(); every other call runs as it is.
    (Inside __torch_function__ the mode is off, so the replacements' own ops run plainly.)"""

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
            if (0 < dropout_p < 1 and query.device.type == "cpu"
                    and not _arg(args, kwargs, 5, "is_causal", False)
                    and not kwargs.get("enable_gqa", False) and query.dim() == 4
                    and query.shape[1] == key.shape[1]):
                return attention(*args[:3], attn_mask=_arg(args, kwargs, 3, "attn_mask", None),
                                 dropout_p=dropout_p, scale=_arg(args, kwargs, 6, "scale", None))
        return func(*args, **kwargs)


def training_ops(model, device):
    """CpuDropout while `model` trains on a CPU; nothing otherwise (CUDA's dropout is fused)."""
    training = getattr(model, "training", False)
    return CpuDropout() if training and torch.device(device).type == "cpu" else contextlib.nullcontext()


if __name__ == "__main__":
    not_a_script(__file__)
