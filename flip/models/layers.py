"""Shared building blocks of the ID-based CTR models, and their common base class ``IdModel``.

Notation used in every docstring: ``B`` batch size, ``F`` number of fields, ``d`` embedding size,
``D = F * d`` the flattened embedding size, ``P = F * (F - 1) / 2`` the number of field pairs.

Every layer is written for one fused call per step wherever possible (one embedding lookup for all
fields, ``addmm``/``addcmul`` instead of separate matmul/mul/add, no per-field or per-expert Python
loops). Only ``torch`` is imported: this must run on a bare GPU machine.

Initialisation follows FuxiCTR: ``nn.Linear`` weights xavier-normal, biases zero (see
``init_weights``); embeddings ``N(0, EMBEDDING_INIT_STD)`` with the padding row kept at zero.
Layers that own raw ``nn.Parameter`` tensors initialise them themselves.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# FLIP's authors (and FuxiCTR) draw embeddings from N(0, 1e-4). With Adam the scale of the start
# hardly matters (each used entry moves by ~lr per step): on a synthetic interaction task every model
# here learnt as fast from 1e-4 as from 1e-2 (AFM and DCNv2 slightly faster), so keep the authors'.
EMBEDDING_INIT_STD = 1e-4


def init_weights(module: nn.Module) -> None:
    """FuxiCTR's initialisation, applied with ``model.apply(init_weights)``.

    ``nn.Linear``: xavier-normal weight, zero bias. ``nn.Embedding``: ``N(0, EMBEDDING_INIT_STD)``
    with the ``padding_idx`` row set to zero. Everything else keeps its own initialisation.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=EMBEDDING_INIT_STD)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


# ------------------------------------------------------------------------------------ base model
# The prediction layer of an IdModel (``fc``, and ``first_order`` where the model has one): pretraining
# leaves it untrained (frozen) and finetuning starts it fresh.
HEAD_MODULES = ("fc", "first_order")


class IdModel(nn.Module):
    """Common base of the ID-based CTR models.

    Input ``x``: LongTensor (B, F) of *global* feature ids into one shared table of ``vocab_size``
    rows: 0 = padding (zero row, no gradient), 1 = the shared ``[MASK]`` feature, then per-field
    values (including each field's OOV id).

    Attributes every subclass sets:
      ``embedding``  nn.Embedding(vocab_size, d, padding_idx=0), shared by all fields
      ``output_dim`` size of ``v = encode(x)``
      ``fc``         nn.Linear(output_dim, 1): the final prediction layer

    ``forward(x) = logit(encode(x)) + first_order(x)``: models with a first-order (LR / "wide")
    term set ``self.first_order`` to a ``LogisticRegression``; it is ``None`` for the others.
    """

    output_dim: int
    fc: nn.Linear

    def __init__(self, num_fields: int, vocab_size: int, embedding_dim: int = 32, **options: Any) -> None:
        super().__init__()
        if num_fields < 1 or vocab_size < 2 or embedding_dim < 1:
            raise ValueError(
                f"bad model size: num_fields={num_fields}, vocab_size={vocab_size}, "
                f"embedding_dim={embedding_dim}"
            )
        self.num_fields = num_fields
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.first_order: LogisticRegression | None = None
        self.output_dim = self.build(**options)
        self.fc = nn.Linear(self.output_dim, 1)
        self.apply(init_weights)

    def build(self, **options: Any) -> int:
        """Create the model's layers after the embedding table (keyword-only ``options``, named as the
        ``IdModelConfig`` keys they come from); return ``output_dim``. The base class then adds the
        prediction layer ``fc`` and initialises every weight (:func:`init_weights`)."""
        raise NotImplementedError

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The keyword options of :meth:`build`."""
        params = inspect.signature(cls.build).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @classmethod
    def from_config(cls, cfg: Any, num_fields: int, vocab_size: int) -> "IdModel":
        """The model of an ``IdModelConfig``: every option of :meth:`build` that is a config key, by name."""
        options = {name: getattr(cfg, name) for name in cls.options() if hasattr(cfg, name)}
        return cls(num_fields, vocab_size, embedding_dim=cfg.embedding_dim, **options)

    def freeze_head(self) -> None:
        """Freeze the prediction layer (:data:`HEAD_MODULES`): pretraining leaves it untrained."""
        for name in HEAD_MODULES:
            module = getattr(self, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    def use_sparse_gradients(self) -> list[nn.Parameter]:
        """Make every vocabulary-sized table (``embedding``, and the first-order table where the model has
        one) produce row-sparse gradients (``nn.Embedding(sparse=True)``: only the rows a batch looks up);
        returns those tables, which then need a row-sparse optimizer (``flip.train.sparse_updates``).
        The forward pass and the weights are unchanged."""
        tables = [m for m in self.modules() if isinstance(m, nn.Embedding)]
        for table in tables:
            table.sparse = True
        return [t.weight for t in tables]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) ids -> (B, F, d): one lookup for all fields."""
        return self.embedding(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) ids -> (B, output_dim): the representation right before the prediction layer."""
        raise NotImplementedError

    def logit(self, v: torch.Tensor) -> torch.Tensor:
        """(B, output_dim) -> (B,)."""
        return self.fc(v).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) ids -> (B,) logits (pre-sigmoid)."""
        out = self.logit(self.encode(x))
        if self.first_order is not None:
            out = out + self.first_order(x)
        return out


class _SparseRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.shape = weight.shape
        ctx.save_for_backward(ids)
        return weight[ids]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ids,) = ctx.saved_tensors
        values = grad.reshape(-1, *ctx.shape[1:])
        return torch.sparse_coo_tensor(ids.reshape(1, -1), values, ctx.shape, check_invariants=False), None


def sparse_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` (any shape of ``ids``) whose gradient with respect to ``weight`` is a sparse COO
    tensor holding only the rows used: ``F.embedding(..., sparse=True)`` for a tensor that is not 2-D
    (e.g. a (V,) bias over the vocabulary)."""
    return _SparseRows.apply(weight, ids)


# ------------------------------------------------------------------------------ generic blocks
class Dropout(nn.Dropout):
    """Inverted dropout, ``h * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` i.i.d.; shape-preserving.

    Same maths as ``nn.Dropout``. PyTorch's CPU ``bernoulli_`` is MKL-parallel on Intel CPUs only;
    elsewhere (AMD, ARM) it draws every mask element as a double, serially (two Mersenne-Twister
    calls each), and dropout then costs ~20% of a DCNv2 training step. There the mask is drawn as
    ``U >= p`` from one float32 uniform per element (the same 2^-24 resolution as ``torch.rand``),
    which halves that cost. Intel CPUs and accelerators use ``F.dropout``.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return h
        if h.device.type != "cpu" or self.p >= 1.0 or self.inplace or not _serial_cpu_bernoulli():
            return F.dropout(h, self.p, True, self.inplace)
        noise = torch.rand_like(h).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # (same shape as h)
        return h * noise


_SERIAL_CPU_BERNOULLI: bool | None = None


def _serial_cpu_bernoulli() -> bool:
    """True unless PyTorch's CPU ``bernoulli_`` takes its MKL path (MKL build on an Intel CPU)."""
    global _SERIAL_CPU_BERNOULLI
    if _SERIAL_CPU_BERNOULLI is None:
        intel = False
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                intel = "GenuineIntel" in fh.read(4096)
        except OSError:  # not Linux: keep the stock kernel
            intel = True
        _SERIAL_CPU_BERNOULLI = not (intel and torch.backends.mkl.is_available())
    return _SERIAL_CPU_BERNOULLI


class LogisticRegression(nn.Module):
    """First-order term ``sum_f w[x_f]`` with its own (vocab_size, 1) table, padding row 0.

    (B, F) -> (B,). No bias: the model's ``fc`` already has one.
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Embedding(vocab_size, 1, padding_idx=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x).sum(dim=(1, 2))


class MLP(nn.Module):
    """The DNN tower: per hidden layer ``Linear -> [BatchNorm1d] -> ReLU -> [Dropout]``.

    (B, input_dim) -> (B, output_dim) with ``output_dim = hidden_units[-1]`` (``input_dim`` when
    ``hidden_units`` is empty: the identity).
    """

    def __init__(self, input_dim: int, hidden_units: list[int], dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = input_dim
        for units in hidden_units:
            layers.append(nn.Linear(dim, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(nn.ReLU(inplace=True))  # addmm/BN do not need their output for backward
            if dropout > 0:
                layers.append(Dropout(dropout))
            dim = units
        self.net = nn.Sequential(*layers)
        self.output_dim = dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


# ---------------------------------------------------------------------------- cross networks
class CrossNet(nn.Module):
    """DCN (v1) cross network, ``L`` layers: ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l``.

    (B, D) -> (B, D). Per layer a vector ``w_l`` (D) and bias ``b_l`` (D): 2 * D * L parameters.
    """

    def __init__(self, input_dim: int, num_layers: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(num_layers, input_dim))
        self.b = nn.Parameter(torch.zeros(num_layers, input_dim))
        # FuxiCTR: each w_l is an nn.Linear(D, 1, bias=False) -> xavier-normal, fan_in=D, fan_out=1
        nn.init.normal_(self.w, std=math.sqrt(2.0 / (input_dim + 1)))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.w, self.b):
            s = x @ w  # (B,) = x_l . w_l
            x = torch.addcmul(x + b, x0, s.unsqueeze(1))  # x_l + b_l + x_0 * s
        return x


class CrossNetV2(nn.Module):
    """DCNv2 full-rank cross network, ``L`` layers: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``.

    (B, D) -> (B, D). ``W_l`` (D, D), ``b_l`` (D): ``L * (D^2 + D)`` parameters.
    """

    def __init__(self, input_dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(input_dim, input_dim) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = torch.addcmul(x, x0, layer(x))  # x_l + x_0 * (W x_l + b), one fused kernel
        return x


class CrossNetMix(nn.Module):
    """DCN-Mix: low-rank mixture-of-experts cross network (DCNv2 paper, Sec. 3.3; FuxiCTR's
    ``CrossNetMix``, used by the FLIP authors), ``L`` layers, ``E`` experts of rank ``r``::

        g(x_l)    = softmax(G x_l)                                 (E,)  gate shared by all layers
        E_e(x_l)  = x_0 * (U_e^l tanh(C_e^l tanh(V_e^l^T x_l)) + b_l)   (D,)
        x_{l+1}   = sum_e g_e(x_l) E_e(x_l) + x_l

    Because the gate sums to one this equals ``x_0 * (sum_e g_e U_e v_e + b_l) + x_l``: all experts
    are evaluated together (one matmul each for the gate, ``V`` and ``U`` with the experts side by
    side, one ``bmm`` for ``C``), with no per-expert loop.

    (B, D) -> (B, D). Parameters: ``U, V`` (L, E, D, r), ``C`` (L, E, r, r), ``b`` (L, D), gate
    ``G`` (E, D): ``L * (2 E D r + E r^2 + D) + E D``.
    """

    def __init__(self, input_dim: int, num_layers: int, low_rank: int = 32, num_experts: int = 4) -> None:
        super().__init__()
        L, E, D, r = num_layers, num_experts, input_dim, low_rank
        self.num_experts, self.low_rank = E, r
        self.U = nn.Parameter(torch.empty(L, E, D, r))
        self.V = nn.Parameter(torch.empty(L, E, D, r))
        self.C = nn.Parameter(torch.empty(L, E, r, r))
        self.b = nn.Parameter(torch.zeros(L, D))
        self.gate = nn.Parameter(torch.empty(E, D))
        # FuxiCTR: xavier-normal on each layer's (E, D, r) / (E, r, r) tensor; each expert's gate
        # is an nn.Linear(D, 1, bias=False) -> xavier-normal with fan_in=D, fan_out=1.
        for layer in range(L):
            nn.init.xavier_normal_(self.U.data[layer])
            nn.init.xavier_normal_(self.V.data[layer])
            nn.init.xavier_normal_(self.C.data[layer])
        nn.init.normal_(self.gate, std=math.sqrt(2.0 / (D + 1)))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        B = x0.shape[0]
        E, r = self.num_experts, self.low_rank
        x = x0
        for layer in range(self.U.shape[0]):
            g = torch.softmax(F.linear(x, self.gate), dim=1)  # (B, E)
            V = self.V[layer].permute(1, 0, 2).reshape(-1, E * r)  # (D, E*r): all experts side by side
            v = torch.tanh(x @ V).view(B, E, r).transpose(0, 1)  # (E, B, r)
            v = torch.tanh(torch.bmm(v, self.C[layer].transpose(1, 2)))  # (E, B, r): v <- C_e v
            v = v * g.t().unsqueeze(2)  # (E, B, r): weight each expert by its gate
            U = self.U[layer].permute(0, 2, 1).reshape(E * r, -1)  # (E*r, D)
            uv = torch.addmm(self.b[layer], v.transpose(0, 1).reshape(B, E * r), U)  # (B, D)
            x = torch.addcmul(x, x0, uv)  # x_l + x_0 * (sum_e g_e U_e v_e + b_l)
        return x


# ----------------------------------------------------------------------- feature interactions
def _pair_indices(num_fields: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column indices of the P field pairs (i < j), in row-major order."""
    rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
    return rows, cols


class FMInteraction(nn.Module):
    """Factorization-machine second-order term as a vector (Rendle 2010)::

        0.5 * ((sum_f e_f)^2 - sum_f e_f^2)  = sum_{i<j} e_i * e_j

    (B, F, d) -> (B, d); summing it over d gives the FM logit.
    """

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        s = e.sum(dim=1)  # (B, d)
        return 0.5 * (s * s - (e * e).sum(dim=1))


class InnerProduct(nn.Module):
    """Pairwise inner products ``<e_i, e_j>`` for i < j (IPNN).

    (B, F, d) -> (B, P): one batched ``e e^T`` then the upper triangle.
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        rows, cols = _pair_indices(num_fields)
        self.register_buffer("flat_index", rows * num_fields + cols, persistent=False)
        self.output_dim = int(rows.numel())

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(e, e.transpose(1, 2))  # (B, F, F)
        return gram.flatten(1).index_select(1, self.flat_index)  # (B, P)


class OuterProduct(nn.Module):
    """OPNN product with sum pooling (Qu et al. 2016, Sec. 3.2): ``p = f_S f_S^T``,
    ``f_S = sum_f e_f``.

    (B, F, d) -> (B, d * d).
    """

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.output_dim = embedding_dim * embedding_dim

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        s = e.sum(dim=1)  # (B, d)
        return (s.unsqueeze(2) * s.unsqueeze(1)).flatten(1)  # (B, d*d)


class PairwiseProduct(nn.Module):
    """Element-wise products of all field pairs ``e_i * e_j`` for i < j (AFM).

    (B, F, d) -> (B, P, d).
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        rows, cols = _pair_indices(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.num_pairs = int(rows.numel())

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return e.index_select(1, self.rows) * e.index_select(1, self.cols)


class AttentionPooling(nn.Module):
    """AFM attention over pair interactions (Xiao et al. 2017, Eq. 5)::

        a_ij = softmax_ij( h^T ReLU(W (e_i * e_j) + b) ),   out = sum_ij a_ij (e_i * e_j)

    (B, P, d) -> (B, d). Parameters: ``W`` (A, d), ``b`` (A), ``h`` (A).
    """

    def __init__(self, embedding_dim: int, attention_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(embedding_dim, attention_dim)
        self.h = nn.Linear(attention_dim, 1, bias=False)
        self.dropout = Dropout(dropout)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        scores = self.h(torch.relu(self.proj(p)))  # (B, P, 1)
        a = self.dropout(torch.softmax(scores, dim=1))  # (B, P, 1)
        return (a * p).sum(dim=1)  # (B, d)


class CIN(nn.Module):
    """Compressed interaction network of xDeepFM (Lian et al. 2018, Eq. 6), as in FuxiCTR::

        X^k_{h,*} = sum_{i,j} W^{k,h}_{i,j} (X^{k-1}_{i,*} * X^0_{j,*}) + b^{k,h}
        p^k       = sum over the embedding axis of X^k                         (H_k,)

    The 1x1 convolution of the paper is a linear map over the ``F * H_{k-1}`` channels; feature
    maps are kept as (B, d, H) so that it is one matmul with no transposes.

    (B, F, d) -> (B, sum_k H_k). Parameters: ``sum_k (F * H_{k-1} * H_k + H_k)``, ``H_0 = F``.
    """

    def __init__(self, num_fields: int, layer_units: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        prev = num_fields
        for units in layer_units:
            self.layers.append(nn.Linear(num_fields * prev, units))
            prev = units
        self.output_dim = sum(layer_units)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        B, F_, d = e.shape
        x0 = e.transpose(1, 2)  # (B, d, F)
        x = x0
        pooled = []
        for layer in self.layers:
            z = (x.unsqueeze(3) * x0.unsqueeze(2)).reshape(B, d, -1)  # (B, d, H_{k-1} * F)
            x = layer(z)  # (B, d, H_k)
            pooled.append(x.sum(dim=1))  # (B, H_k)
        return torch.cat(pooled, dim=1)


class MultiHeadSelfAttention(nn.Module):
    """AutoInt interacting layer (Song et al. 2019, Eqs. 5-8), as in FuxiCTR::

        head_h = softmax(Q_h K_h^T * scale) V_h       with Q, K, V = e W_Q, e W_K, e W_V
        out    = ReLU(concat_h head_h + e W_res)

    (B, F, input_dim) -> (B, F, attention_dim). ``W_Q, W_K, W_V`` (input_dim -> attention_dim, no
    bias) computed as one matmul; ``W_res`` only when ``input_dim != attention_dim`` (otherwise the
    residual is the identity). ``scale`` = 1 as in AutoInt (FuxiCTR ``use_scale=False``).
    """

    def __init__(self, input_dim: int, attention_dim: int, num_heads: int, dropout: float = 0.0, use_scale: bool = False) -> None:
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim={attention_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attention_dim = attention_dim
        self.dropout = dropout
        self.scale = (attention_dim // num_heads) ** -0.5 if use_scale else 1.0
        self.qkv = nn.Linear(input_dim, 3 * attention_dim, bias=False)
        self.residual = nn.Linear(input_dim, attention_dim, bias=False) if input_dim != attention_dim else None

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        B, F_, _ = e.shape
        H, A = self.num_heads, self.attention_dim
        q, k, v = self.qkv(e).view(B, F_, 3, H, A // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, F, A/H)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )  # (B, H, F, A/H)
        out = out.transpose(1, 2).reshape(B, F_, A)  # (B, F, A)
        res = e if self.residual is None else self.residual(e)
        return torch.relu(out + res)


class LogTransform(nn.Module):
    """AFN logarithmic transformation layer (Cheng et al. 2020, Eqs. 4-5), as in FuxiCTR::

        y_j = exp( sum_f w_{j,f} ln|e_f| )  = prod_f |e_f|^{w_{j,f}}     (element-wise over d)

    with ``|e|`` clamped at 1e-5 and BatchNorm over the fields after the log and over the ``N``
    logarithmic neurons after the exp.

    (B, F, d) -> (B, N * d). Parameters: ``W`` (N, F), BatchNorm1d(F), BatchNorm1d(N).
    """

    def __init__(self, num_fields: int, log_neurons: int) -> None:
        super().__init__()
        self.coefficients = nn.Linear(num_fields, log_neurons, bias=False)
        self.log_bn = nn.BatchNorm1d(num_fields)
        self.exp_bn = nn.BatchNorm1d(log_neurons)
        self.output_dim_per_embedding = log_neurons

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        # always fp32, also under bf16 autocast: exp() turns the ~0.4% rounding error of a bf16 sum
        # of logs into errors of the same size *in the exponent* (AFN trains far worse in bf16)
        with torch.autocast(e.device.type, enabled=False):
            log_e = self.log_bn(torch.log(e.float().abs().clamp(min=1e-5)))  # (B, F, d)
            y = self.coefficients(log_e.transpose(1, 2)).transpose(1, 2)  # (B, N, d)
            y = self.exp_bn(torch.exp(y))  # (B, N, d)
        return y.flatten(1)  # (B, N*d)
