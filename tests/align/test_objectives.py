"""Each objective against a hand computation on tiny tensors, and NCE against the exact softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flip.align.objectives import (
    CrossAttention,
    FieldHeads,
    IclObjective,
    MlmHead,
    MlmObjective,
    MtmObjective,
    NoiseSampler,
    info_nce,
    mlm_loss,
    nce_loss,
)


def logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


# ========================================================================================= MLM
def test_mlm_loss_two_masked_tokens_by_hand():
    """D_t = 2, D_v = 1, V_t = 3; dense and decoder weights set by hand, no dropout."""
    head = MlmHead(text_dim=2, tab_dim=1, vocab_size=3, dropout=0.0)
    with torch.no_grad():
        head.dense.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))  # [h ⊕ v] -> (h0, v)
        head.dense.bias.zero_()
        head.decoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.decoder.bias.zero_()
    states = torch.full((1, 4, 2), float("nan"))  # unmasked positions must never be touched
    states[0, 1] = torch.tensor([1.0, 0.0])
    states[0, 3] = torch.tensor([0.0, 1.0])
    v = torch.tensor([[2.0]])
    labels = torch.tensor([[-100, 2, -100, 0]])
    out = mlm_loss(head, states, v, labels)
    t1, t2 = math.tanh(1.0), math.tanh(2.0)
    ce_a = -(t1 + t2) + logsumexp([t1, t2, t1 + t2])  # token 1: logits (t1, t2, t1 + t2), target 2
    ce_b = -0.0 + logsumexp([0.0, t2, t2])  # token 3: logits (0, t2, t2), target 0
    assert out["loss"].item() == pytest.approx((ce_a + ce_b) / 2, abs=1e-6)
    assert int(out["count"]) == 2
    assert out["acc"].item() == pytest.approx(0.5)  # token 1 right (argmax 2), token 3 wrong (argmax 1)


def test_mlm_constant_logits_by_hand_and_no_mask_is_zero():
    head = MlmHead(text_dim=3, tab_dim=2, vocab_size=3, dropout=0.0)
    with torch.no_grad():
        head.decoder.weight.zero_()
        head.decoder.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    states, v = torch.randn(2, 5, 3), torch.randn(2, 2)
    labels = torch.full((2, 5), -100)
    labels[0, 2], labels[1, 4] = 0, 2
    lse = logsumexp([1.0, 2.0, 3.0])
    out = mlm_loss(head, states, v, labels)
    assert out["loss"].item() == pytest.approx(((lse - 1) + (lse - 3)) / 2, abs=1e-6)

    states.requires_grad_(True)
    empty = mlm_loss(head, states, v, torch.full((2, 5), -100))
    assert empty["loss"].item() == 0.0 and torch.isfinite(empty["loss"])
    empty["loss"].backward()
    assert states.grad is not None and (states.grad == 0).all()


def test_mlm_without_joint_reconstruction_ignores_v():
    obj = MlmObjective(text_dim=4, tab_dim=3, vocab_size=7, joint=False)
    assert obj.head.dense.in_features == 4
    obj.eval()
    states, labels = torch.randn(2, 3, 4), torch.tensor([[1, -100, 2], [-100, 3, -100]])
    a = obj(states, torch.randn(2, 3), labels)["loss"]
    b = obj(states, None, labels)["loss"]
    assert torch.equal(a, b)


# ========================================================================================= ICL
def icl_by_hand(zt, zv, tau, cosine):
    def norm(z):
        n = math.sqrt(sum(c * c for c in z))
        return [c / n for c in z]

    if cosine:
        zt, zv = [norm(z) for z in zt], [norm(z) for z in zv]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    B = len(zt)
    total = 0.0
    for i in range(B):
        row = [dot(zt[i], zv[j]) / tau for j in range(B)]
        col = [dot(zv[i], zt[j]) / tau for j in range(B)]
        total += -(row[i] - logsumexp(row)) - (col[i] - logsumexp(col))
    return total / (2 * B)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_icl_symmetric_infonce_b3_by_hand(similarity):
    zt = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    zv = [[1.0, 0.5], [1.0, 1.0], [0.0, 1.0]]
    expected = icl_by_hand(zt, zv, 0.7, similarity == "cosine")
    out = info_nce(torch.tensor(zt), torch.tensor(zv), 0.7, similarity)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    # through the module with identity projections
    obj = IclObjective(text_dim=2, tab_dim=2, projection_dim=2, temperature=0.7, similarity=similarity)
    with torch.no_grad():
        for lin in (obj.text_proj, obj.tab_proj):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    assert obj(torch.tensor(zt), torch.tensor(zv))["loss"].item() == pytest.approx(expected, abs=1e-6)


def test_icl_accuracy_and_perfect_alignment():
    z = torch.eye(4) * 10
    out = info_nce(z, z, 0.7, "dot")
    assert out["acc"].item() == 1.0 and out["loss"].item() < 1e-6


# ================================================================================ cross-attention
def test_cross_attention_with_padding_by_hand():
    torch.manual_seed(0)
    att = CrossAttention(tab_dim=2, text_dim=3)
    Q = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    with torch.no_grad():
        att.Q.copy_(Q)
    v_hat = torch.tensor([[1.0, 0.0], [0.3, -0.7]])
    w = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    w[1, 2:] = 1e4  # padded states: must get zero weight
    u, weights = att(v_hat, w, mask, return_weights=True)
    for b in range(2):
        q = [sum(v_hat[b, i].item() * Q[i, d].item() for i in range(2)) for d in range(3)]
        n = int(mask[b].sum())
        s = [sum(q[d] * w[b, j, d].item() for d in range(3)) / math.sqrt(3) for j in range(n)]
        z = logsumexp(s)
        a = [math.exp(x - z) for x in s]
        expect = [sum(a[j] * w[b, j, d].item() for j in range(n)) for d in range(3)]
        assert u[b].tolist() == pytest.approx(expect, abs=1e-5)
        assert weights[b, :n].tolist() == pytest.approx(a, abs=1e-6)
        assert (weights[b, n:] == 0).all()


def test_field_heads_match_independent_mlps():
    torch.manual_seed(0)
    heads = FieldHeads(num_fields=3, in_dim=5, hidden_dim=4, out_dim=2)
    with torch.no_grad():
        heads.b1.normal_()
        heads.b2.normal_()
    h = torch.randn(4, 5)
    rows, fields = torch.tensor([0, 0, 2, 3, 1]), torch.tensor([1, 2, 0, 2, 1])
    out = heads(h, rows, fields)
    for m in range(5):
        f = int(fields[m])
        hid = torch.relu(h[rows[m]] @ heads.w1[:, f, :] + heads.b1[f])
        assert torch.allclose(out[m], hid @ heads.w2[f] + heads.b2[f], atol=1e-6)


# ======================================================================================== MTM
# ids 0 pad, 1 mask; field 0 = {2, 3}, field 1 = {4, 5}
COUNTS = torch.tensor([0.0, 0.0, 3.0, 1.0, 2.0, 2.0], dtype=torch.float64)
RANGES = [(2, 2), (4, 2)]


def test_noise_sampler_frequencies():
    g = torch.Generator().manual_seed(0)
    s = NoiseSampler(COUNTS, RANGES, "global")
    ids = s.sample(torch.zeros(20000, dtype=torch.long), 5, g).flatten()
    freq = torch.bincount(ids, minlength=6).double() / ids.numel()
    assert freq[:2].sum() == 0  # zero-count ids are never drawn
    assert torch.allclose(freq, COUNTS / 8, atol=0.01)
    assert torch.allclose(s.log_q[2:].double().exp(), COUNTS[2:] / 8, atol=1e-6)
    p = NoiseSampler(COUNTS, RANGES, "per_field")
    fields = torch.tensor([0, 1]).repeat(10000)
    ids = p.sample(fields, 4, g)
    assert ((ids >= 2) & (ids <= 3))[fields == 0].all() and ((ids >= 4) & (ids <= 5))[fields == 1].all()
    f0 = ids[fields == 0].flatten()
    assert (f0 == 2).double().mean().item() == pytest.approx(0.75, abs=0.01)
    assert p.log_q[2:].exp().tolist() == pytest.approx([0.75, 0.25, 0.5, 0.5], abs=1e-6)


def nce_by_hand(c, E, b, target, noise, q, K, V):
    total = 0.0
    for m in range(len(target)):
        def delta(j):
            s = sum(c[m][d] * E[j][d] for d in range(len(c[m]))) + b[j]
            return s - math.log(V) - math.log(K * q[j])
        dp = delta(target[m])
        loss = math.log1p(math.exp(-dp))  # -log σ(Δ)
        for j in noise[m]:
            loss += math.log1p(math.exp(delta(j)))  # -log(1 - σ(Δ))
        total += loss
    return total / len(target)


@pytest.mark.parametrize("noise_mode", ["global", "per_field"])
def test_nce_loss_with_logit_correction_by_hand(noise_mode):
    obj = MtmObjective(tab_dim=3, text_dim=4, embed_dim=2, counts=COUNTS, field_ranges=RANGES, joint=False,
                       loss="nce", noise=noise_mode, num_negatives=3)
    q = (COUNTS / 8).tolist() if noise_mode == "global" else [0, 0, 0.75, 0.25, 0.5, 0.5]
    # bias initialised to log q + log V (authors' NCE scorer); zero-count ids clamped
    assert obj.out_bias[2:].tolist() == pytest.approx([math.log(x) + math.log(6) for x in q[2:]], abs=1e-5)
    E = [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]]
    b = [0.0, 0.0, 0.2, -0.1, 0.3, 0.0]
    with torch.no_grad():
        obj.out_embedding.weight.copy_(torch.tensor(E))
        obj.out_bias.copy_(torch.tensor(b))
    c = [[0.5, -1.0], [2.0, 0.1], [0.0, 0.3]]
    obj.queries = lambda *args: torch.tensor(c)  # fixed c_{i,f}
    noise = [[3, 2, 2], [5, 5, 4], [4, 5, 4]] if noise_mode == "per_field" else [[3, 4, 5], [2, 2, 3], [5, 4, 3]]
    obj.sampler.sample = lambda fields, num, generator=None, uniforms=None: torch.tensor(noise)  # fixed noise draws
    x = torch.tensor([[2, 5], [3, 4]])
    chosen = torch.tensor([[True, True], [False, True]])  # pairs (0,0) -> 2, (0,1) -> 5, (1,1) -> 4
    out = obj(torch.zeros(2, 3), None, None, x, chosen)
    expected = nce_by_hand(c, E, b, [2, 5, 4], noise, q, 3, 6)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-5)
    assert int(out["count"]) == 3


@pytest.mark.parametrize("noise_mode", ["global", "per_field"])
def test_softmax_mtm_is_exact_cross_entropy(noise_mode):
    torch.manual_seed(0)
    obj = MtmObjective(tab_dim=3, text_dim=4, embed_dim=2, counts=COUNTS, field_ranges=RANGES, joint=True,
                       loss="softmax", noise=noise_mode)
    v_hat, w, attn = torch.randn(2, 3), torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long)
    x = torch.tensor([[2, 5], [3, 4]])
    chosen = torch.tensor([[True, False], [True, True]])
    rows, fields = chosen.nonzero(as_tuple=True)
    c = obj.queries(v_hat, w, attn, rows, fields)
    logits = c @ obj.out_embedding.weight.t() + obj.out_bias
    if noise_mode == "per_field":  # candidates = the field's own ids
        allowed = torch.tensor([[False, False, True, True, False, False], [False] * 4 + [True, True]])[fields]
        logits = logits.masked_fill(~allowed, float("-inf"))
    expected = F.cross_entropy(logits, x[rows, fields])
    assert obj(v_hat, w, attn, x, chosen)["loss"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_mtm_without_masked_fields_is_zero_not_nan():
    obj = MtmObjective(tab_dim=3, text_dim=4, embed_dim=2, counts=COUNTS, field_ranges=RANGES)
    v_hat = torch.randn(2, 3, requires_grad=True)
    out = obj(v_hat, torch.randn(2, 5, 4), torch.ones(2, 5), torch.tensor([[2, 5], [3, 4]]),
              torch.zeros(2, 2, dtype=torch.bool))
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert (v_hat.grad == 0).all()


def test_nce_approaches_softmax_as_k_grows():
    """Why this check is sound: with the model log-probability log p̃(j) = s(j) − log V and the
    NCE logit Δ(j) = log p̃(j) − log(K q(j)), the expected NCE gradient w.r.t. the scores is

        ∂E[L]/∂s_j = K q_j p̃_j / (p̃_j + K q_j) − [j = t] · K q_t / (p̃_t + K q_t)

    which tends to p̃_j − [j = t] as K → ∞: the gradient of the softmax cross-entropy
    (softmax(s)_j − [j = t]) whenever the model is self-normalised (Σ_j p̃_j = 1). Likewise
    E[L] − log K − log q_t − Σ_j p̃_j → −log p̃_t = the exact cross-entropy. So we fix scores with
    Σ p̃ = 1 and a target t on a 12-id vocabulary, draw the noise with the real sampler from a
    non-uniform q, average the autograd gradient over many draws, and check that (a) it matches
    the closed-form expectation for each K (the sampler and the loss are right), (b) its distance
    to the softmax gradient shrinks monotonically with K and is small at K = 2000, and (c) the
    corrected loss converges to the exact cross-entropy.
    """
    g = torch.Generator().manual_seed(0)
    V, t = 12, 3
    counts = torch.arange(1, V + 1, dtype=torch.float64) ** 1.5  # non-uniform noise
    sampler = NoiseSampler(counts, [(0, V)], "global")
    q = sampler.log_q.double().exp()
    p_model = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)
    s0 = p_model.log() + math.log(V)  # self-normalised: Σ exp(s − log V) = 1
    soft_grad = p_model.clone()
    soft_grad[t] -= 1
    ce = -p_model[t].log().item()
    errors = []
    for K in (5, 50, 2000):
        reps = 4000 if K < 2000 else 400
        s = s0.clone().requires_grad_(True)
        noise = sampler.sample(torch.zeros(reps, dtype=torch.long), K, g)  # (reps, K)
        log_p = s - math.log(V)
        d_pos = (log_p[t] - math.log(K) - q[t].log()).expand(reps)
        d_noise = log_p[noise] - math.log(K) - q[noise].log()
        loss = nce_loss(d_pos, d_noise)
        loss.backward()
        expect = K * q * p_model / (p_model + K * q)
        expect[t] -= K * q[t] / (p_model[t] + K * q[t])
        assert torch.allclose(s.grad, expect, atol=0.02)  # (a) Monte Carlo = closed form
        errors.append((s.grad - soft_grad).norm().item())
        corrected = loss.item() - math.log(K) - q[t].log().item() - 1.0
        if K == 2000:
            assert corrected == pytest.approx(ce, abs=0.02)  # (c)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03  # (b)
    cos = F.cosine_similarity(s.grad, soft_grad, dim=0).item()
    assert cos > 0.999
