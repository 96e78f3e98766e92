"""The nine ID-based CTR models on a tiny schema: contract, parameter counts, gradients, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flip.config import IdModelConfig
from flip.models import MODELS, IdModel, build_id_model
from flip.models.layers import (
    CIN,
    Dropout,
    CrossNetMix,
    FMInteraction,
    InnerProduct,
    MultiHeadSelfAttention,
    OuterProduct,
    PairwiseProduct,
)

NAMES = ["dcnv2", "dcn", "deepfm", "autoint", "xdeepfm", "pnn", "widedeep", "afn", "afm"]
NUM_FIELDS = 4
VOCAB = 50
PER_FIELD = 12  # field f owns ids 2 + 12 f .. 2 + 12 f + 11 (0 = padding, 1 = [MASK])


def tiny_config(name: str, **changes) -> IdModelConfig:
    cfg = IdModelConfig(
        name=name,
        embedding_dim=16,
        dnn_hidden_units=[32, 16],
        dropout=0.1,
        cross_layers=2,
        low_rank=4,
        num_experts=3,
        attention_layers=2,
        attention_heads=2,
        attention_dim=16,
        cin_layer_units=[8, 6],
        afn_log_neurons=12,
        afm_attention_dim=8,
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def build(name: str, seed: int = 0, **changes) -> IdModel:
    torch.manual_seed(seed)
    return build_id_model(tiny_config(name, **changes), NUM_FIELDS, VOCAB)


def random_ids(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    local = torch.randint(0, PER_FIELD, (batch, NUM_FIELDS), generator=g)
    return 2 + PER_FIELD * torch.arange(NUM_FIELDS) + local


def mlp_params(input_dim: int, hidden: list[int]) -> int:
    total, prev = 0, input_dim
    for h in hidden:
        total += prev * h + h
        prev = h
    return total


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------- factory
def test_registry_names():
    assert list(MODELS) == NAMES
    for cls in MODELS.values():
        assert issubclass(cls, IdModel)


def test_unknown_name_raises_listing_valid_names():
    with pytest.raises(ValueError) as err:
        build_id_model(IdModelConfig(name="fibinet"), NUM_FIELDS, VOCAB)
    for name in NAMES:
        assert name in str(err.value)


def test_default_dcnv2_output_dim_matches_authors():
    model = build_id_model(IdModelConfig(), num_fields=8, vocab_size=1000)
    assert model.output_dim == 8 * 32 + 128 == 384
    assert isinstance(model.cross, CrossNetMix)


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_contract(name):
    model = build(name)
    x = random_ids(5)
    v = model.encode(x)
    assert v.shape == (5, model.output_dim) and v.dtype == torch.float32
    assert model.logit(v).shape == (5,)
    assert model(x).shape == (5,)
    assert isinstance(model.embedding, torch.nn.Embedding)
    assert model.embedding.weight.shape == (VOCAB, 16) and model.embedding.padding_idx == 0
    assert model.fc.in_features == model.output_dim and model.fc.bias is not None


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_logit_of_encode_plus_first_order(name):
    model = build(name).eval()
    x = random_ids(7)
    expected = model.logit(model.encode(x))
    if model.first_order is not None:
        expected = expected + model.first_order.weight.weight[x].sum(dim=(1, 2))
    torch.testing.assert_close(model(x), expected)
    has_lr = name in {"deepfm", "widedeep", "xdeepfm", "afm"}
    assert (model.first_order is not None) == has_lr


# -------------------------------------------------------------------------------- parameters
def test_param_count_dcnv2_full_rank():
    model = build("dcnv2", low_rank_mixture=False)
    D, d, L, H = NUM_FIELDS * 16, 16, 2, [32, 16]
    expected = VOCAB * d + L * (D * D + D) + mlp_params(D, H) + (D + H[-1] + 1)
    assert n_params(model) == expected


def test_param_count_dcnv2_low_rank_mixture():
    model = build("dcnv2")
    D, d, L, E, r, H = NUM_FIELDS * 16, 16, 2, 3, 4, [32, 16]
    cross = L * (2 * E * D * r + E * r * r + D) + E * D
    expected = VOCAB * d + cross + mlp_params(D, H) + (D + H[-1] + 1)
    assert n_params(model) == expected


def test_param_count_dcn_deepfm_widedeep_pnn():
    D, d, H = NUM_FIELDS * 16, 16, [32, 16]
    head = H[-1] + 1
    assert n_params(build("dcn")) == VOCAB * d + 2 * 2 * D + mlp_params(D, H) + D + head
    assert n_params(build("deepfm")) == VOCAB * d + VOCAB + mlp_params(D, H) + d + head
    assert n_params(build("widedeep")) == VOCAB * d + VOCAB + mlp_params(D, H) + head
    P = NUM_FIELDS * (NUM_FIELDS - 1) // 2
    assert n_params(build("pnn")) == VOCAB * d + mlp_params(D + P, H) + head


def test_param_count_xdeepfm_autoint_afn_afm():
    F_, D, d, H = NUM_FIELDS, NUM_FIELDS * 16, 16, [32, 16]
    cin = (F_ * F_ * 8 + 8) + (F_ * 8 * 6 + 6)
    assert n_params(build("xdeepfm")) == VOCAB * d + VOCAB + cin + mlp_params(D, H) + (8 + 6 + H[-1] + 1)
    A = 16  # attention_dim == d, so no residual projection in either layer
    assert n_params(build("autoint")) == VOCAB * d + 2 * (d * 3 * A) + F_ * A + 1
    assert n_params(build("autoint", attention_dim=8)) == VOCAB * d + (d * 3 * 8 + d * 8) + 8 * 3 * 8 + F_ * 8 + 1
    N = 12
    assert n_params(build("afn")) == VOCAB * d + N * F_ + 2 * F_ + 2 * N + mlp_params(N * d, H) + H[-1] + 1
    afn_plus = build("afn", afn_ensemble_dnn=True)  # + a DNN on the same table; the head sees both towers
    assert n_params(afn_plus) == VOCAB * d + N * F_ + 2 * F_ + 2 * N + mlp_params(N * d, H) + mlp_params(D, H) + 2 * H[-1] + 1
    assert afn_plus.encode(random_ids(5)).shape == (5, 2 * H[-1])
    assert n_params(build("afm")) == VOCAB * d + VOCAB + (d * 8 + 8) + 8 + d + 1


# ---------------------------------------------------------------------- padding and [MASK] rows
@pytest.mark.parametrize("name", NAMES)
def test_padding_row_zero_and_no_gradient(name):
    model = build(name)
    tables = [model.embedding] + ([model.first_order.weight] if model.first_order is not None else [])
    for table in tables:
        assert torch.all(table.weight[0] == 0)
    x = random_ids(16)
    x[:, -1] = 0  # last field padded
    x[::3, 0] = 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        for table in tables:
            assert torch.all(table.weight.grad[0] == 0)
        opt.step()
    for table in tables:
        assert torch.all(table.weight[0] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_mask_row_gets_gradient(name):
    model = build(name)
    x = random_ids(16)
    unmasked = random_ids(16)
    x[:, 1] = 1  # field 1 masked everywhere
    x[::2, 2] = 1
    model(x).sum().backward()
    assert model.embedding.weight.grad[1].abs().sum() > 0
    model.zero_grad()
    model(unmasked).sum().backward()
    assert torch.all(model.embedding.weight.grad[1] == 0)


# ---------------------------------------------------------------------------------- learning
def xor_problem(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """label = [field-0 value in its first half] XOR [field-1 value in its first half]."""
    x = random_ids(n, seed=7)
    local = x - (2 + PER_FIELD * torch.arange(NUM_FIELDS))
    y = ((local[:, 0] < PER_FIELD // 2) ^ (local[:, 1] < PER_FIELD // 2)).float()
    return x, y


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_learnable_problem(name):
    model = build(name, seed=3)
    x, y = xor_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):  # AFM, which must route the signal through its attention, needs ~50
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = F.binary_cross_entropy_with_logits(model(x), y).item()
    assert final < 0.5 * losses[0], (name, losses[0], final)


# ------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_model_and_outputs(name):
    x = random_ids(9)
    a, b = build(name, seed=11), build(name, seed=11)
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb), ka
    torch.manual_seed(5)
    ya = a(x)  # train mode: dropout draws from the seeded generator
    torch.manual_seed(5)
    yb = b(x)
    assert torch.equal(ya, yb)
    assert not torch.equal(a.embedding.weight, build(name, seed=12).embedding.weight)


# ------------------------------------------------------------------------------------ layers
def test_fm_interaction_is_sum_of_pairwise_products():
    e = torch.randn(3, 5, 4)
    pairs = PairwiseProduct(5)(e)  # (3, 10, 4)
    assert pairs.shape == (3, 10, 4)
    torch.testing.assert_close(FMInteraction()(e), pairs.sum(dim=1))
    torch.testing.assert_close(InnerProduct(5)(e), pairs.sum(dim=2))
    s = e.sum(dim=1)
    torch.testing.assert_close(OuterProduct(4)(e), torch.einsum("bi,bj->bij", s, s).flatten(1))


def test_cross_net_mix_matches_per_expert_reference():
    """The batched DCN-Mix equals FuxiCTR's loop over experts with a softmax-weighted sum."""
    torch.manual_seed(0)
    D, L, E, r = 12, 2, 3, 4
    layer = CrossNetMix(D, L, r, E)
    with torch.no_grad():
        layer.b.normal_()
    V, C, U = layer.V, layer.C, layer.U  # FuxiCTR's layout: U, V (L, E, D, r), C (L, E, r, r)
    x0 = torch.randn(6, D)
    x = x0
    for i in range(L):
        outs, gates = [], []
        for e in range(E):
            gates.append(x @ layer.gate[e])  # (B,)
            v = torch.tanh(x @ V[i, e])  # (B, r)
            v = torch.tanh(v @ C[i, e].t())
            outs.append(x0 * (v @ U[i, e].t() + layer.b[i]))  # (B, D)
        g = torch.softmax(torch.stack(gates, 1), dim=1)  # (B, E)
        x = (torch.stack(outs, 2) * g.unsqueeze(1)).sum(2) + x
    torch.testing.assert_close(layer(x0), x)


def test_cross_net_mix_init_matches_fuxictr_scale():
    torch.manual_seed(0)
    D, E, r = 256, 4, 32
    layer = CrossNetMix(D, 2, r, E)
    std_uv = (2.0 / (D * r + E * r)) ** 0.5  # xavier-normal on an (E, D, r) tensor
    std_c = (2.0 / (r * r + E * r)) ** 0.5  # ... on an (E, r, r) tensor
    assert abs(layer.V[0].std().item() / std_uv - 1) < 0.02
    assert abs(layer.U[1].std().item() / std_uv - 1) < 0.02
    assert abs(layer.C[0].std().item() / std_c - 1) < 0.05


def test_cin_matches_einsum_reference():
    torch.manual_seed(0)
    B, F_, d = 3, 4, 5
    cin = CIN(F_, [6, 2])
    e = torch.randn(B, F_, d)
    x0, x, pooled = e, e, []
    for layer in cin.layers:
        z = torch.einsum("bhd,bmd->bhmd", x, x0).reshape(B, -1, d)  # FuxiCTR's Conv1d(k=1) input
        x = torch.einsum("oc,bcd->bod", layer.weight, z) + layer.bias[:, None]
        pooled.append(x.sum(-1))
    torch.testing.assert_close(cin(e), torch.cat(pooled, 1))


def test_self_attention_matches_manual_heads():
    torch.manual_seed(0)
    att = MultiHeadSelfAttention(4, 6, num_heads=2).eval()
    e = torch.randn(2, 3, 4)
    q, k, v = att.qkv(e).split(6, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(3 * h, 3 * h + 3)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2), dim=-1)
        heads.append(w @ v[..., sl])
    expected = torch.relu(torch.cat(heads, -1) + att.residual(e))
    torch.testing.assert_close(att(e), expected)


@pytest.mark.parametrize("name", ["dcnv2", "deepfm", "pnn", "afn"])
def test_batch_norm_variant_trains(name):
    model = build(name, seed=3, batch_norm=True)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.dnn.modules())
    x, y = xor_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()  # the running statistics, not the batch's
    with torch.no_grad():
        out = model(x)
    assert out.shape == (512,)
    final = F.binary_cross_entropy_with_logits(out, y).item()
    assert final < 0.5 * first, (name, first, final)


def test_outer_product_pnn():
    torch.manual_seed(0)
    model = MODELS["pnn"](NUM_FIELDS, VOCAB, embedding_dim=8, dnn_hidden_units=[16], product_type="outer")
    assert model(random_ids(3)).shape == (3,)
    assert n_params(model) == VOCAB * 8 + mlp_params(NUM_FIELDS * 8 + 8 * 8, [16]) + 17
    with pytest.raises(ValueError):
        MODELS["pnn"](NUM_FIELDS, VOCAB, product_type="kernel")


def test_dropout_is_inverted_bernoulli():
    drop = Dropout(0.25)
    h = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(0)
    out = drop(h)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    out.sum().backward()
    torch.testing.assert_close(h.grad, out.detach())  # d(h * m / (1-p)) / dh = m / (1-p)
    assert torch.equal(drop.eval()(h), h)
    assert torch.equal(Dropout(0.0).train()(h), h)


@pytest.mark.parametrize("name", NAMES)
def test_config_reaches_the_model_by_name(name):
    """``from_config`` passes every option by its config key: dropout and batch_norm cannot swap."""
    import dataclasses

    keys = {f.name for f in dataclasses.fields(IdModelConfig)}
    options = MODELS[name].options()
    assert set(options) - keys <= {"product_type"}  # PNN's product choice is not a config knob
    model = build(name, dropout=0.37, batch_norm=True)
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    drops += [m.dropout for m in model.modules() if isinstance(m, MultiHeadSelfAttention)]
    if "dropout" in options:
        assert any(p == pytest.approx(0.37) for p in drops)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    if "batch_norm" in options:
        assert norms
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.in_features == model.output_dim


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        MODELS["dcnv2"](NUM_FIELDS, VOCAB, 8, [16])  # the options cannot be given by position
