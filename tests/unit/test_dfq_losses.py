"""MaskAQ / PSAQ losses, mask schedule, fast attention statistics and the held-out KL on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from maskaq_deploy.calib.dfq import DFQConfig
from maskaq_deploy.calib.dfq import losses as L
from maskaq_deploy.calib.dfq.augment import resized_crop_flip
from maskaq_deploy.calib.dfq.config import FinetuneConfig

LOG_2PI_E = math.log(2 * math.pi * math.e)


def _logits_with_patch_block(block: torch.Tensor, num_prefix: int, heads: int = 2) -> torch.Tensor:
    """[1, heads, N, N] logits whose head-average patch block is ``block`` (heads differ, prefix is noise)."""
    p = block.shape[-1]
    n = p + num_prefix
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, heads, n, n, generator=g) * 5
    spread = torch.linspace(-1, 1, heads).reshape(heads, 1, 1)  # sums to 0 over heads
    x[0, :, num_prefix:, num_prefix:] = block + spread * torch.randn(p, p, generator=g)
    return x


# --- entropy of patch similarity

def test_entropy_of_orthogonal_rows_matches_the_formula():
    p = 4
    logits = _logits_with_patch_block(torch.eye(p) * 3.0, num_prefix=1)
    # Rows of 3*I normalize to unit vectors e_i: S = I (P x P), Var(S) = 1/P - 1/P^2 over the P^2 entries.
    var = 1 / p - 1 / p ** 2
    expected = 0.5 * (LOG_2PI_E + math.log(var + 1e-8))
    assert L.similarity_entropy(logits, num_prefix=1, rows=64).item() == pytest.approx(expected, abs=1e-5)


def test_entropy_row_sampling_uses_the_requested_number_of_rows():
    p = 6
    logits = _logits_with_patch_block(torch.eye(p), num_prefix=2)
    g = torch.Generator().manual_seed(1)
    # Any 2 of the orthonormal rows give S = I_2: Var = 1/2 - 1/4.
    expected = 0.5 * (LOG_2PI_E + math.log(0.25 + 1e-8))
    assert L.similarity_entropy(logits, 2, rows=2, generator=g).item() == pytest.approx(expected, abs=1e-5)


def test_entropy_of_identical_rows_is_very_low_and_averages_over_leading_dims():
    same = torch.ones(5, 5)  # all rows identical: S = 1 everywhere, Var = 0 -> log(eps)
    low = 0.5 * (LOG_2PI_E + math.log(1e-8))
    eye = 0.5 * (LOG_2PI_E + math.log(1 / 5 - 1 / 25 + 1e-8))
    stacked = torch.cat([_logits_with_patch_block(same, 1), _logits_with_patch_block(torch.eye(5), 1)])
    assert L.similarity_entropy(stacked, 1).item() == pytest.approx((low + eye) / 2, abs=1e-3)


# --- informative-region mask

def test_mask_ratio_decays_linearly_from_start_to_end():
    assert L.mask_ratio(0, 100) == pytest.approx(0.5)
    assert L.mask_ratio(50, 100) == pytest.approx(0.3)
    assert L.mask_ratio(100, 100) == pytest.approx(0.1)
    assert L.mask_ratio(200, 100) == pytest.approx(0.1)  # clamped after the end


def test_mask_keeps_top_k_then_drops_a_fraction_at_random():
    scores = torch.stack([torch.arange(10.0), torch.arange(10.0).flip(0)])
    g = torch.Generator().manual_seed(0)
    full = L.informative_mask(scores, ratio=0.5, drop=0.0)
    assert full[0].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    assert full[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    dropped = L.informative_mask(scores, ratio=0.5, drop=0.3, generator=g)
    assert dropped.sum(1).tolist() == [4.0, 4.0]  # round(5 * 0.7) = 4 kept of the top 5
    assert torch.all(dropped <= full)  # only top-k patches survive
    # k = max(1, int(P * ratio)): never empty
    assert L.informative_mask(scores, ratio=0.01, drop=0.3).sum(1).tolist() == [1.0, 1.0]


def test_mask_drop_is_random_per_row_and_seeded():
    scores = torch.arange(40.0).repeat(64, 1)
    m1 = L.informative_mask(scores, 0.5, 0.3, torch.Generator().manual_seed(3))
    m2 = L.informative_mask(scores, 0.5, 0.3, torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)
    assert len({tuple(r.tolist()) for r in m1}) > 1  # rows drop different patches


def test_cls_scores_use_the_cls_row_or_the_mean_received_logit():
    block = torch.arange(9.0).reshape(3, 3)
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, :, 0, 1:] = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # CLS row per head
    logits[0, :, 1:, 1:] = block
    assert L.cls_patch_scores(logits, 1, has_cls=True)[0].tolist() == [2.0, 3.0, 4.0]
    assert L.cls_patch_scores(logits, 1, has_cls=False)[0].tolist() == [3.0, 4.0, 5.0]  # column means


def test_masked_l1_normalizes_by_mask_size_and_averages_layers():
    a = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[0.0, 0.0, 0.0, 0.0]]])  # [L=2, B=1, P=4]
    b = torch.zeros_like(a)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    # layer 0: (|1| + |3|) / 2 = 2; layer 1: 0 -> mean 1
    assert L.masked_l1(a, b, mask).item() == pytest.approx(1.0)


# --- SSIM terms

def test_interhead_ssim_of_identical_heads_is_zero_and_of_unrelated_heads_is_near_one():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(2, 1, 65, 65, generator=g)
    same = one.expand(2, 4, 65, 65)
    assert L.interhead_ssim(same, 1).item() == pytest.approx(0.0, abs=1e-5)
    unrelated = torch.randn(2, 4, 65, 65, generator=g)
    # SSIM of independent maps ~ 0 (its sd over 64 pixels ~ 1/8), so 1 - SSIM^2 ~ 1
    assert L.interhead_ssim(unrelated, 1).item() == pytest.approx(1.0, abs=0.03)
    assert L.interhead_ssim(torch.randn(2, 1, 9, 9), 1).item() == 0.0  # one head: no pairs


def test_interhead_ssim_is_invariant_to_per_row_affine_changes():
    # min-max normalization: a head whose rows are 3 * x + 7 of another's is SSIM-identical to it
    x = torch.randn(1, 1, 17, 17)
    pair = torch.cat([x, 3 * x + 7], dim=1)
    assert L.interhead_ssim(pair, 1).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_fast_attention_stats_match_plain_autograd(num_prefix):
    torch.manual_seed(0)
    base = torch.randn(3, 4, 11 + num_prefix, 11 + num_prefix, dtype=torch.float64).float() * 2 + 1
    x1 = base.clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    has_cls = num_prefix > 0
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = (L.interhead_ssim(x1, num_prefix) + 0.3 * L.similarity_entropy(x1, num_prefix, 6, g1)
             + (L.cls_patch_scores(x1, num_prefix, has_cls) ** 2).mean())
    st = L.attention_stats(x2, num_prefix, pairs=True, headmean=True, cls=has_cls)
    scores = st.cls if has_cls else st.headmean.mean(-2)
    fast = (L.interhead_ssim_from_stats(st.mu, st.lo, st.hi, st.gram)
            + 0.3 * L.similarity_entropy_headmean(st.headmean, 6, g2) + (scores ** 2).mean())
    plain.backward()
    fast.backward()
    assert fast.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_masked_output_ssim_identical_is_zero_unrelated_near_one_and_weights_top_patches():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3, 201, 8, generator=g)  # [B, H, N, d], 1 prefix token
    assert L.masked_output_ssim(p, p.clone(), 1).item() == pytest.approx(0.0, abs=1e-5)
    q = torch.randn(2, 3, 201, 8, generator=g)
    assert L.masked_output_ssim(p, q, 1).item() == pytest.approx(1.0, abs=0.05)
    # Corrupt only the most active teacher patch: a larger weight there must raise the loss.
    p2 = torch.zeros(1, 1, 11, 1)
    p2[0, 0, 1:, 0] = torch.tensor([9.0, 1, -1, 2, -2, 1, -1, 2, -2, 0.5])
    q2 = p2.clone()
    q2[0, 0, 1, 0] = -9.0
    low = L.masked_output_ssim(p2, q2, 1, top_frac=0.1, high=1.0).item()
    high = L.masked_output_ssim(p2, q2, 1, top_frac=0.1, high=4.0).item()
    assert high > low > 0


# --- image prior, KD, PSAQ entropy

def test_total_variation_of_a_step_image():
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    # horizontal diffs: two -1 -> sqrt(2); vertical: 0; each diagonal: one -1 -> 1 / sqrt(2)
    assert L.total_variation(x).item() == pytest.approx(2 * math.sqrt(2), rel=1e-6)


def test_soft_targets_split_each_row_between_its_label_and_one_other_class():
    labels = torch.arange(10).repeat(20)  # 200 images, every class
    t = L.soft_targets(labels, 10, 0.3, torch.Generator().manual_seed(0))
    assert t.shape == (200, 10)
    assert torch.allclose(t.sum(1), torch.ones(200), atol=1e-6)
    own = t[torch.arange(200), labels]
    assert bool(((own >= 0.7 - 1e-6) & (own <= 1.0)).all())  # the label keeps 1 - lam, lam in [0, 0.3)
    assert bool(((t > 0).sum(1) <= 2).all())  # one other class at most
    rest = t.clone()
    rest[torch.arange(200), labels] = 0
    assert torch.allclose(rest.sum(1), 1 - own, atol=1e-6)
    assert len(set(rest.argmax(1).tolist())) == 10  # the other class varies
    assert own.min() < 0.75 and own.max() > 0.95  # lam spreads over its range
    # a fixed generator seed gives the same targets; mix 0 gives the one-hot labels
    assert torch.equal(t, L.soft_targets(labels, 10, 0.3, torch.Generator().manual_seed(0)))
    hard = L.soft_targets(labels, 10, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(hard, torch.nn.functional.one_hot(labels, 10).float())


def test_kd_kl_matches_the_closed_form():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax(t) = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert L.kd_kl(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert L.kd_kl(t, t, temperature=5.0).item() == pytest.approx(0.0, abs=1e-7)


def _kde_entropy_loops(outputs, num_prefix, bw, points):
    """Straightforward loop version of PSAQ-ViT's estimate, for comparison."""
    total = 0.0
    for layer in outputs:
        f = layer.mean(dim=-3)[..., num_prefix:, :]
        f = f / f.norm(dim=-1, keepdim=True)
        sims = [f[m] @ f[m].T for m in range(f.shape[0])]
        lo = min(s.min().item() for s in sims)
        hi = max(s.max().item() for s in sims)
        xs = torch.linspace(lo, hi, points)
        ents = []
        for s in sims:
            v = s.flatten()
            pdf = torch.stack([torch.exp(-(x - v) ** 2 / (2 * bw * bw)).mean() for x in xs])
            pdf = pdf / math.sqrt(2 * math.pi * bw * bw) + 1e-4
            ents.append(torch.trapezoid(-pdf * pdf.log(), xs))
        total += sum(ents) / len(ents)
    return total


def test_kde_similarity_entropy_matches_a_loop_implementation():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 2, 7, 5, generator=g)  # [L, B, H, N, d]
    got = L.kde_similarity_entropy(out, 1, bandwidth=0.05, points=10).item()
    assert got == pytest.approx(float(_kde_entropy_loops(out, 1, 0.05, 10)), rel=1e-4)


# --- augmentation

def test_resized_crop_flip_identity_and_flip():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(resized_crop_flip(x, 1.0, False, g), x)
    y = resized_crop_flip(x, 1.0, True, g)
    flipped = torch.all(torch.isclose(y, x.flip(-1)).flatten(1), dim=1)
    same = torch.all(torch.isclose(y, x).flatten(1), dim=1)
    assert torch.all(flipped | same) and 10 < int(flipped.sum()) < 54


def test_holdout_kl_is_the_mean_kl_at_temperature_one_over_all_images():
    from torch import nn

    from maskaq_deploy.calib.dfq.finetune import holdout_kl

    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    cfg = DFQConfig(finetune=FinetuneConfig(batch_size=3))  # 4 batches, the last one short: a per-image mean,
    # not a mean of batches
    teacher, student = nn.Identity(), nn.Identity()
    assert holdout_kl(teacher, student, logits, cfg, torch.device("cpu"), None) == pytest.approx(0.0, abs=1e-7)
    shifted = _Scaled(2.0)
    p, q = logits.softmax(-1), (2 * logits).softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert holdout_kl(teacher, shifted, logits, cfg, torch.device("cpu"), None) == pytest.approx(expected, rel=1e-5)


class _Scaled(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x
