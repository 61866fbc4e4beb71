"""mAP@k coefficient of the teacher's predictions (Sec. 4.4, Eq. 5), vectorised in torch.

For one example and one of the start/end distributions, rank the teacher's positions by logit
and keep the top k (only positions that may hold an answer are ranked: the context tokens and
[CLS], `mask` True). A ranked position j is relevant when it lies in a window of 2*delta tokens
around the gold position s:

    rel(j) = 1  if  s - delta <= j < s + delta  else 0

(half-open, 2*delta positions, as the authors' code `range(s - delta, s + delta)`). Two scores:

variant="first-hit" (the default): the reciprocal rank 1/r of the first relevant position in
    the top k, 0 if none. This is what the authors' code computed for the published numbers (its
    "mAP@k" has a single relevant item), and the only score that can draw the paper's Fig. 4
    (alpha ~0.6 at the start, 1.0 from mid-training on): a confident teacher whose top-1 is
    relevant scores 1.0 whatever its other nine positions are.

variant="eq5": Eq. 5 as printed,

    alpha_kl^l = (1/N) sum_{i=1..N} AP@k_i,
    AP@k_i     = sum_{r=1..k} P(r) rel(r) / min(k, 2*delta)

    where N is the number of examples (rows), r the rank, P(r) the precision of the top r. The
    paper divides by 2*Delta; min(k, 2*delta) equals it for the defaults k=10, delta=5 (and keeps
    AP <= 1 when k < 2*delta). The normaliser does not shrink when the window is cut by the
    sequence edges or by masked positions, nor when fewer than k positions are allowed. So an
    answer-less window (gold = [CLS] = 0: one allowed position in its window) scores at most 0.1,
    and a confident teacher whose other top-10 positions lie outside the window scores 0.1; a
    batch holding such rows can never reach alpha = 1, which is why Fig. 4 cannot come from it.

relevant="authors" (--map-k-relevant authors): the authors' ranking and relevant positions: every
position of the (padded) window is ranked, question and padding included, and the window of
2*delta positions is relevant whatever it holds, so for an answer-less window (gold 0 = [CLS])
positions 1..delta-1 (question tokens) count as hits. Pass the unmasked logits (train_qa.qa_logits
with softmax_support="all") of windows padded as theirs (to --max-length) for their exact ranking.

The coefficient of Eq. 6 is the average of the start and end alphas: `map_at_k` for a batch,
`alpha_per_row` for groups of rows (the authors' 6-row micro-batches).
Everything runs under torch.no_grad: alpha is a weight on the KL term, never a path for
gradients. No Python loop over examples or ranks.
"""
import torch

from common import not_a_script

VARIANTS = ("first-hit", "eq5")   # the first is the default
RELEVANT = ("masked", "authors")  # ranking over the allowed positions (default), or theirs


@torch.no_grad()
def average_precision_at_k(logits, gold, k=10, delta=5, variant="first-hit", mask=None,
                           relevant="masked"):
    """AP@k of each row of `logits` [B, L] against gold positions `gold` [B] -> float tensor [B].

    mask: bool [B, L], True where a position may hold an answer; masked positions are never
    ranked, even when fewer than k positions are allowed. variant: "first-hit" or "eq5".
    relevant="authors": the mask is ignored (every position ranked, the whole window relevant).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if relevant not in RELEVANT:
        raise ValueError(f"relevant must be one of {RELEVANT}, got {relevant!r}")
    if k < 1 or delta < 1:
        raise ValueError(f"k and delta must be >= 1 (got k={k}, delta={delta})")
    logits = logits.detach().float()
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, length], got shape {tuple(logits.shape)}")
    B, L = logits.shape
    if mask is None or relevant == "authors":
        mask = torch.ones_like(logits, dtype=torch.bool)
    mask = mask.to(logits.device).bool()
    gold = torch.as_tensor(gold, device=logits.device).long().view(B, 1)

    kk = min(k, L)
    top = logits.masked_fill(~mask, float("-inf")).topk(kk, dim=-1).indices  # [B, kk], rank order
    # A masked position can only appear in the top k when fewer than k are allowed: never relevant.
    allowed_pick = mask.gather(1, top)
    rel = (allowed_pick & (top >= gold - delta) & (top < gold + delta)).float()  # window of Eq. 5

    ranks = torch.arange(1, kk + 1, device=logits.device, dtype=torch.float32)
    if variant == "eq5":
        precision = rel.cumsum(dim=1) / ranks                                  # P(r)
        return (precision * rel).sum(dim=1) / min(k, 2 * delta)                # Eq. 5, AP@k
    # first-hit: reciprocal rank of the first relevant position (argmax returns the first max)
    first = rel.argmax(dim=1)
    return torch.where(rel.any(dim=1), 1.0 / ranks[first], torch.zeros_like(ranks[first]))


@torch.no_grad()
def map_at_k(start_logits, end_logits, start_positions, end_positions, k=10, delta=5,
             variant="first-hit", mask=None, relevant="masked"):
    """alpha = (mAP@k over the batch for start + the same for end) / 2 (Eq. 5, Eq. 6).

    Returns a 0-dim float tensor on the logits' device (no host sync; call float() to read it).
    """
    ap_start = average_precision_at_k(start_logits, start_positions, k, delta, variant, mask, relevant)
    ap_end = average_precision_at_k(end_logits, end_positions, k, delta, variant, mask, relevant)
    return (ap_start.mean() + ap_end.mean()) / 2


@torch.no_grad()
def alpha_per_row(start_logits, end_logits, start_positions, end_positions, group_rows, k=10,
                  delta=5, variant="first-hit", mask=None, relevant="masked"):
    """alpha of Eq. 6 for each group of `group_rows` consecutive rows (the last may be shorter),
    given to every row of its group -> float tensor [B].

    The authors' 24-row step is 4 accumulated micro-batches of 6 rows, each with its own alpha;
    group_rows=6 reproduces that inside one whole-batch pass (DESIGN, corrected 2026-11-28), and
    group_rows >= B gives one alpha for the batch, `map_at_k`'s value, on every row.
    """
    ap = (average_precision_at_k(start_logits, start_positions, k, delta, variant, mask, relevant) +
          average_precision_at_k(end_logits, end_positions, k, delta, variant, mask, relevant)) / 2
    group = torch.arange(len(ap), device=ap.device) // group_rows
    sums = torch.zeros(int(group[-1]) + 1, device=ap.device).index_add_(0, group, ap)
    return (sums / torch.bincount(group))[group]


if __name__ == "__main__":
    not_a_script(__file__)
