"""The MaskAQ / PSAQ-ViT losses, as pure functions on captured attention tensors.

Shapes (``...`` = any leading dims, typically [layers, batch] for a ViT, [batch * windows] for a Swin layer):

* attention logits: ``[..., heads, N, N]`` raw ``q @ k^T`` (before scale, bias, softmax), N tokens
* attention outputs: ``[..., heads, N, head_dim]`` (``attn @ v``)

``num_prefix`` is the number of leading non-patch tokens (CLS, distillation, register tokens); they are dropped
wherever a loss is about patches. Every function is vectorized over all leading dims, heads and head pairs
(no Python loops), and computes in float32 whatever dtype the models ran in (bf16 autocast on GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI_E = math.log(2.0 * math.pi * math.e)
# SSIM stability constants for a dynamic range of 1 (maps are min-max normalized to [0, 1] first).
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def similarity_entropy(logits: torch.Tensor, num_prefix: int, rows: int = 64,
                       generator: torch.Generator | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Differential entropy of patch similarity, averaged over all leading dims (layers, images, windows).

    Per map: average the logits over heads, drop prefix rows and columns, keep ``rows`` random query rows
    (all of them when there are fewer patches), L2-normalize each row, take the cosine-similarity matrix S
    among the kept rows and, under a Gaussian approximation, H = 0.5 * (log(2*pi*e) + log Var(S)) with the
    population variance over all entries of S. MaskAQ maximizes H (the loss is ``-H``).
    """
    a = logits.float().mean(dim=-3)[..., num_prefix:, num_prefix:]  # [..., P, P]
    return similarity_entropy_headmean(a, rows, generator, eps)


def similarity_entropy_headmean(a: torch.Tensor, rows: int = 64, generator: torch.Generator | None = None,
                                eps: float = 1e-8) -> torch.Tensor:
    """``similarity_entropy`` from the head-averaged patch block ``[..., P, P]`` of the logits."""
    n = a.shape[-1]
    if rows < n:
        # An independent random subset of query rows per map; ``argsort`` of uniforms is a batched randperm.
        u = torch.rand(a.shape[:-1], generator=generator, device=generator.device if generator else a.device)
        idx = u.to(a.device).argsort(dim=-1)[..., :rows]
        a = a.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, n))
    v = F.normalize(a, p=2, dim=-1, eps=1e-6)
    s = v @ v.transpose(-1, -2)
    var = s.flatten(-2).var(dim=-1, unbiased=False) + eps
    return (0.5 * (LOG_2PI_E + var.log())).mean()


def cls_patch_scores(logits: torch.Tensor, num_prefix: int, has_cls: bool) -> torch.Tensor:
    """Per patch score ``[..., P]`` from head-averaged logits ``[..., heads, N, N]``.

    With a CLS token: the CLS row's logits to the patches (distillation / register columns dropped too).
    Without one (global-average-pool ViTs, Swin windows): the mean logit each patch receives from the patch
    queries, the closest analogue of "how much the model looks at this patch".
    """
    a = logits.float().mean(dim=-3)
    if has_cls:
        return a[..., 0, num_prefix:]
    return a[..., num_prefix:, num_prefix:].mean(dim=-2)


def mask_ratio(step: int, total: int, start: float = 0.5, end: float = 0.1) -> float:
    """Linear decay of the kept fraction from ``start`` (step 0) to ``end`` (step ``total``)."""
    p = min(max(step / max(total, 1), 0.0), 1.0)
    return start * (1.0 - p) + end * p


def informative_mask(scores: torch.Tensor, ratio: float, drop: float = 0.3,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary mask [B, P]: the top ``k = max(1, int(ratio * P))`` patches by score, then a random
    ``drop`` fraction of those removed (``max(1, round(k * (1 - drop)))`` kept), independently per row."""
    b, p = scores.shape
    k = min(p, max(1, int(p * ratio)))
    keep = min(k, max(1, round(k * (1.0 - drop))))
    top = scores.detach().topk(k, dim=-1).indices  # [B, k]
    if keep < k:
        u = torch.rand((b, k), generator=generator, device=generator.device if generator else scores.device)
        pick = u.to(scores.device).argsort(dim=-1)[:, :keep]
        top = top.gather(1, pick)
    mask = torch.zeros_like(scores, dtype=torch.float32)
    return mask.scatter_(1, top, 1.0)


def masked_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Masked attention alignment: ``a``, ``b`` [L, B, P] (per layer scores of P and Q), ``mask`` [B, P] or
    [L, B, P]. Per layer: sum |a - b| inside the mask / number of masked entries; mean over layers."""
    m = mask.float()
    if m.dim() == a.dim() - 1:
        m = m.unsqueeze(0).expand_as(a)
    diff = (a.float() - b.float()).abs() * m
    per_layer = diff.flatten(1).sum(-1) / (m.flatten(1).sum(-1) + eps)
    return per_layer.mean()


def interhead_ssim(logits: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Inter-head attention loss: mean over query rows and unique head pairs (i < j) of 1 - SSIM^2.

    Minimizing it drives |SSIM| of head pairs towards 1, i.e. it makes the heads' attention maps structurally
    alike (MimiQ's inter-head similarity, which the MaskAQ reference code builds on), not diverse.

    Each head's attention row (the logits one patch query gives the patches) is a map; maps are min-max
    normalized to [0, 1] and compared with global SSIM (means, variances and covariance over the whole map).
    The normalization is applied analytically to the raw statistics, and the covariances of all head pairs come
    from one batched Gram matrix, so nothing of size heads^2 * patches is ever materialized. With a single
    head there are no pairs and the loss is 0. (The reference averages over all ordered pairs including the
    self-pairs, whose SSIM is exactly 1: its value is (H - 1) / H times this one.)
    """
    x = logits.float()[..., num_prefix:, num_prefix:]  # [..., H, Pq, Pk]
    h = x.shape[-3]
    if h < 2:
        return x.sum() * 0.0
    lo = x.amin(dim=-1)
    rng = x.amax(dim=-1) - lo + 1e-8  # [..., H, Pq]
    mu = x.mean(dim=-1)
    xc = x - mu.unsqueeze(-1)
    n = x.shape[-1]
    cov = torch.einsum("...hqk,...gqk->...qhg", xc, xc) / n  # [..., Pq, H, H] raw covariances
    mu = mu.transpose(-1, -2)  # [..., Pq, H]
    lo = lo.transpose(-1, -2)
    rng = rng.transpose(-1, -2)
    mu_n = (mu - lo) / rng  # statistics of the normalized maps
    ii, jj = torch.triu_indices(h, h, offset=1, device=x.device)
    var = torch.diagonal(cov, dim1=-2, dim2=-1) / rng.square()
    cov_n = cov[..., ii, jj] / (rng[..., ii] * rng[..., jj])
    mi, mj = mu_n[..., ii], mu_n[..., jj]
    ssim = ((2 * mi * mj + SSIM_C1) * (2 * cov_n + SSIM_C2)) / (
        (mi.square() + mj.square() + SSIM_C1) * (var[..., ii] + var[..., jj] + SSIM_C2))
    return (1.0 - ssim.square()).mean()


class AttnStats:
    """Statistics of the patch block X = logits[..., prefix:, prefix:] ([..., H, P, P]) that the synthesis
    losses need; each is None unless requested.

    * ``mu``, ``lo``, ``hi`` [..., H, P]: mean, min and max of every head's attention row
    * ``gram`` [..., P, H, H]: mean over keys of x_h * x_g for every pair of heads, per query row
    * ``headmean`` [..., P, P]: X averaged over heads
    * ``cls`` [..., P]: the CLS row's logits to the patches, averaged over heads
    """

    __slots__ = ("cls", "gram", "headmean", "hi", "lo", "mu")

    def __init__(self, mu, lo, hi, gram, headmean, cls):
        self.mu, self.lo, self.hi, self.gram, self.headmean, self.cls = mu, lo, hi, gram, headmean, cls


class _AttnStatsFn(torch.autograd.Function):
    """Computes AttnStats in one pass over the logits and back-propagates with one batched matmul and a few
    in-place adds into a single full-size gradient. Plain autograd would instead materialize a full-size
    gradient for every slice, mean, min and max (each an expand/scatter of the [..., H, N, N] tensor); that
    was most of the reference's loss cost."""

    @staticmethod
    def forward(ctx, logits, num_prefix, pairs, headmean, cls):
        ctx.set_materialize_grads(False)
        x = logits[..., num_prefix:, num_prefix:]
        if x.dtype != torch.float32:
            x = x.float()
        h, k = x.shape[-3], x.shape[-1]
        mu = lo = hi = gram = mean = row = None
        saved = []
        if pairs:
            hi, hi_idx = x.max(dim=-1)
            lo, lo_idx = x.min(dim=-1)
            mu = x.mean(dim=-1)
            xp = x.transpose(-3, -2).contiguous()  # [..., P, H, K]: one row of every head per query
            gram = torch.matmul(xp, xp.transpose(-1, -2)) / k
            saved = [xp, lo_idx, hi_idx]
        if headmean:
            mean = x.mean(dim=-3)
        if cls:
            row = logits[..., 0, num_prefix:].float().mean(dim=-2)
        ctx.save_for_backward(*saved)
        ctx.meta = (logits.shape, logits.dtype, num_prefix, h, k, pairs)
        empty = logits.new_empty(0)
        return tuple(t if t is not None else empty for t in (mu, lo, hi, gram, mean, row))

    @staticmethod
    def backward(ctx, d_mu, d_lo, d_hi, d_gram, d_mean, d_row):
        shape, dtype, pre, h, k, pairs = ctx.meta
        grads = [g for g in (d_mu, d_lo, d_hi, d_gram, d_mean, d_row) if g is not None]
        if not grads:
            return None, None, None, None, None
        full = torch.zeros(shape, dtype=torch.float32, device=grads[0].device)
        blk = full[..., pre:, pre:]
        if pairs:
            xp, lo_idx, hi_idx = ctx.saved_tensors
            if d_gram is not None:  # d/dx of mean_k x_h x_g, both factors: (dG + dG^T) @ x / K
                gp = torch.matmul(d_gram + d_gram.transpose(-1, -2), xp) / k
                blk.copy_(gp.transpose(-3, -2))
            if d_mu is not None:
                blk.add_(d_mu.unsqueeze(-1) / k)
            if d_lo is not None:
                blk.scatter_add_(-1, lo_idx.unsqueeze(-1), d_lo.unsqueeze(-1))
            if d_hi is not None:
                blk.scatter_add_(-1, hi_idx.unsqueeze(-1), d_hi.unsqueeze(-1))
        if d_mean is not None:
            blk.add_(d_mean.unsqueeze(-3) / h)
        if d_row is not None:
            full[..., 0, pre:].add_(d_row.unsqueeze(-2) / h)
        return full.to(dtype), None, None, None, None


def attention_stats(logits: torch.Tensor, num_prefix: int, *, pairs: bool = False, headmean: bool = False,
                    cls: bool = False) -> AttnStats:
    """AttnStats of one layer's logits ``[..., H, N, N]`` (``cls`` needs a CLS token at index 0)."""
    outs = _AttnStatsFn.apply(logits, num_prefix, pairs, headmean, cls)
    mu, lo, hi, gram, mean, row = outs
    return AttnStats(mu if pairs else None, lo if pairs else None, hi if pairs else None,
                     gram if pairs else None, mean if headmean else None, row if cls else None)


def interhead_ssim_from_stats(mu: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                              gram: torch.Tensor) -> torch.Tensor:
    """``interhead_ssim`` from AttnStats (any extra leading dims, e.g. stacked layers): mu/lo/hi [..., H, P],
    gram [..., P, H, H]."""
    h = mu.shape[-2]
    if h < 2:
        return mu.sum() * 0.0
    rng = (hi - lo + 1e-8).transpose(-1, -2)  # [..., P, H]
    m = mu.transpose(-1, -2)
    mu_n = (m - lo.transpose(-1, -2)) / rng
    ii, jj = torch.triu_indices(h, h, offset=1, device=mu.device)
    var = (torch.diagonal(gram, dim1=-2, dim2=-1) - m.square()) / rng.square()
    cov = (gram[..., ii, jj] - m[..., ii] * m[..., jj]) / (rng[..., ii] * rng[..., jj])
    mi, mj = mu_n[..., ii], mu_n[..., jj]
    ssim = ((2 * mi * mj + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mi.square() + mj.square() + SSIM_C1) * (var[..., ii] + var[..., jj] + SSIM_C2))
    return (1.0 - ssim.square()).mean()


def soft_targets(labels: torch.Tensor, num_classes: int, mix: float, generator: torch.Generator) -> torch.Tensor:
    """[B, C] target probabilities: ``1 - lam`` on each image's label and ``lam ~ U(0, mix)`` on a second class
    drawn uniformly from the others, so the images land between two classes instead of deep inside one."""
    b = len(labels)
    lam = torch.rand(b, generator=generator) * mix
    other = (labels.cpu() + torch.randint(1, num_classes, (b,), generator=generator)) % num_classes
    t = torch.zeros(b, num_classes)
    t[torch.arange(b), labels.cpu()] = 1 - lam
    t[torch.arange(b), other] += lam
    return t.to(labels.device)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Image prior of DeepInversion / MaskAQ: L2 norms (over the whole batch) of horizontal, vertical and
    both diagonal neighbour differences, the diagonals divided by sqrt(2)."""
    d1 = x[..., :, :-1] - x[..., :, 1:]
    d2 = x[..., :-1, :] - x[..., 1:, :]
    d3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    d4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return d1.norm() + d2.norm() + (d3.norm() + d4.norm()) / math.sqrt(2.0)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), batch mean (multiply by the KD weight, e.g. T^2)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def masked_output_ssim(p_out: torch.Tensor, q_out: torch.Tensor, num_prefix: int, top_frac: float = 0.1,
                       high: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Masked SSIM distillation of attention outputs ``[..., H, N, d]`` (teacher ``p_out``, student ``q_out``).

    Prefix tokens are dropped. The patches whose teacher output is most active (mean |value| over heads and
    channels) -- the top ``top_frac`` of them per map, at least one -- get weight ``high``, the others 1. For
    every (head, channel) the sequence over patches of teacher and student is compared with the structure
    term of SSIM under those weights: (2 cov + C2) / (var_p + var_q + C2). Returns 1 - mean SSIM.
    """
    p = p_out.float()[..., num_prefix:, :]
    q = q_out.float()[..., num_prefix:, :]
    n = p.shape[-2]
    importance = p.detach().abs().mean(dim=(-3, -1))  # [..., P]
    k = min(n, max(1, round(n * top_frac)))
    top = importance.topk(k, dim=-1).indices
    w = torch.ones_like(importance).scatter_(-1, top, high)
    w = (w / w.sum(dim=-1, keepdim=True)).unsqueeze(-2).unsqueeze(-1)  # [..., 1, P, 1], sums to 1 over P
    mu_p = (p * w).sum(dim=-2, keepdim=True)
    mu_q = (q * w).sum(dim=-2, keepdim=True)
    pc, qc = p - mu_p, q - mu_q
    var_p = (pc.square() * w).sum(dim=-2)
    var_q = (qc.square() * w).sum(dim=-2)
    cov = (pc * qc * w).sum(dim=-2)
    ssim = (2 * cov + SSIM_C2) / (var_p + var_q + SSIM_C2 + eps)
    return 1.0 - ssim.mean()


def kde_similarity_entropy(outputs: torch.Tensor, num_prefix: int, bandwidth: float = 0.01,
                           points: int = 10) -> torch.Tensor:
    """PSAQ-ViT's patch-similarity entropy, summed over the leading "layer" dim 0 and averaged over the rest.

    ``outputs`` [L, ..., H, N, d]: head-averaged attention outputs of the patches, cosine similarity between
    every pair of patches, a Gaussian kernel density estimate (``bandwidth``) of those similarities evaluated at
    ``points`` points spanning each layer's observed range, and the differential entropy -int p log p by the
    trapezoidal rule. PSAQ-ViT maximizes it (the loss is the negative).
    """
    f = outputs.float().mean(dim=-3)[..., num_prefix:, :]  # [L, ..., P, d]
    f = F.normalize(f, dim=-1, eps=1e-8)
    sims = (f @ f.transpose(-1, -2)).flatten(start_dim=-2)  # [L, ..., P*P]
    lead = sims.shape[:-1]
    sims = sims.reshape(lead[0], -1, sims.shape[-1])  # [L, M, S]
    with torch.no_grad():  # evaluation grid: fixed points over each layer's range (as in PSAQ-ViT)
        lo = sims.amin(dim=(1, 2))
        hi = sims.amax(dim=(1, 2))
        t = torch.linspace(0.0, 1.0, points, device=sims.device)
        grid = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * t  # [L, points]
    diffs = grid[:, None, :, None] - sims.unsqueeze(2)  # [L, M, points, S]
    pdf = torch.exp(-diffs.square() / (2 * bandwidth ** 2)).mean(-1) / math.sqrt(2 * math.pi * bandwidth ** 2)
    pdf = pdf + 1e-4
    integrand = -pdf * pdf.log()
    x = grid.unsqueeze(1).expand_as(integrand)
    ent = torch.trapezoid(integrand, x, dim=-1)  # [L, M]
    return ent.mean(dim=1).sum()
