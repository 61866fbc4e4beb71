"""mAP@k coefficient of the teacher's predictions (Sec. 4.4, Eq. 5), vectorised in torch.

For one example and one of the start/end distributions, rank the teacher's positions by logit
and keep the top k (only positions that may hold an answer are ranked: the context tokens and
[CLS], `mask` True). A ranked position j is relevant when it lies in a window of 2*delta tokens
around the gold position s:

    rel(j) = 1  if  s - delta <= j < s + delta  else 0

(half-open, 2*delta positions, as the authors' code `range(s - delta, s + delta)`). Eq. 5:

    alpha_kl^l = (1/N) sum_{i=1..N} AP@k_i,
    AP@k_i     = sum_{r=1..k} P(r) rel(r) / min(k, 2*delta)

where N is the number of examples (rows) in the batch, r the rank, P(r) the precision of the
top r (relevant among the first r, divided by r). The paper divides by 2*Delta; with k < 2*delta
no ranking could reach AP = 1, so the normaliser is min(k, 2*delta), which equals the paper's
2*Delta for the defaults k=10, delta=5. The normaliser does not shrink when the window is cut by
the sequence edges or by masked positions (e.g. gold = [CLS] = 0, whose window is mostly before
the sequence and over question tokens): such an example scores at most (allowed positions in
its window) / min(k, 2*delta), so it always counts as a weaker teacher signal; nor does it shrink
when fewer than k positions are allowed (then only those are ranked, and rel = 0 beyond them).
The batch coefficient of Eq. 6 is the average of the start and end alphas: `map_at_k`.

variant="first-hit" is what the authors' public code computes (its "mAP@k" uses one relevant
item): the reciprocal rank 1/r of the first top-k position inside the window, 0 if none.

Everything runs under torch.no_grad: alpha is a weight on the KL term, never a path for
gradients. No Python loop over examples or ranks.
"""
import torch

VARIANTS = ("paper", "first-hit")


@torch.no_grad()
def average_precision_at_k(logits, gold, k=10, delta=5, variant="paper", mask=None):
    """AP@k of each row of `logits` [B, L] against gold positions `gold` [B] -> float tensor [B].

    mask: bool [B, L], True where a position may hold an answer; masked positions are never
    ranked, even when fewer than k positions are allowed. variant: "paper" (Eq. 5) or "first-hit".
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if k < 1 or delta < 1:
        raise ValueError(f"k and delta must be >= 1 (got k={k}, delta={delta})")
    logits = logits.detach().float()
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, length], got shape {tuple(logits.shape)}")
    B, L = logits.shape
    mask = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask.to(logits.device).bool()
    gold = torch.as_tensor(gold, device=logits.device).long().view(B, 1)

    kk = min(k, L)
    top = logits.masked_fill(~mask, float("-inf")).topk(kk, dim=-1).indices  # [B, kk], rank order
    # A masked position can only appear in the top k when fewer than k are allowed: never relevant.
    allowed_pick = mask.gather(1, top)
    rel = (allowed_pick & (top >= gold - delta) & (top < gold + delta)).float()  # window of Eq. 5

    ranks = torch.arange(1, kk + 1, device=logits.device, dtype=torch.float32)
    if variant == "paper":
        precision = rel.cumsum(dim=1) / ranks                                  # P(r)
        return (precision * rel).sum(dim=1) / min(k, 2 * delta)                # Eq. 5, AP@k
    # first-hit: reciprocal rank of the first relevant position (argmax returns the first max)
    first = rel.argmax(dim=1)
    return torch.where(rel.any(dim=1), 1.0 / ranks[first], torch.zeros_like(ranks[first]))


@torch.no_grad()
def map_at_k(start_logits, end_logits, start_positions, end_positions, k=10, delta=5,
             variant="paper", mask=None):
    """alpha = (mAP@k over the batch for start + the same for end) / 2 (Eq. 5, Eq. 6).

    Returns a 0-dim float tensor on the logits' device (no host sync; call float() to read it).
    """
    ap_start = average_precision_at_k(start_logits, start_positions, k, delta, variant, mask)
    ap_end = average_precision_at_k(end_logits, end_positions, k, delta, variant, mask)
    return (ap_start.mean() + ap_end.mean()) / 2
