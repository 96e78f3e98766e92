"""The three pretraining objectives of FLIP (paper §3.3.3-3.3.5, Eq. 5-11).

Notation: ``B`` rows, ``L`` tokens, ``F`` fields, ``D_t`` PLM hidden size, ``D_v`` size of the ID
model's representation ``v``, ``V_t`` text vocabulary, ``V`` global feature vocabulary (all
fields), ``M`` masked tokens (MLM) or masked (row, field) pairs (MTM), ``K`` noise features.

MLM, Eq. 5-6 (``MlmObjective``)
    q_{i,l} = g_PLM([ŵ_{i,l} ⊕ v_i])  for the masked positions l only (gathered first, so the
    (B, L, V_t) logits the authors' code computes are never built); ``g_PLM`` = Linear(D_t + D_v,
    D_t) -> Tanh -> Dropout -> Linear(D_t, V_t) (the authors' head; the paper says "two-layer
    MLP"). Loss = cross-entropy averaged over all masked tokens of the batch; a batch without
    masked tokens gives a zero loss that is still part of the graph (never NaN).

MTM, Eq. 7-10 (``MtmObjective``)
    u_i = softmax(v̂_i Q w_iᵀ / sqrt(D_t)) w_i  over the COMPLETE text's token states, padding
    masked out (Eq. 7; ``CrossAttention``). For every masked field f an independent two-layer MLP
    g_ID^(f) (hidden 128, ReLU) maps [v̂_i ⊕ u_i] to a query c_{i,f} (D_e = ID embedding size; the
    authors use one linear layer per field). We feed [v̂ ⊕ u]
    (as the authors' code does) rather than u alone (Eq. 8 literally): with u alone v̂ would only
    steer the attention. The F heads are batched parameters (``FieldHeads``): one matmul computes
    the first layer of every head, then the masked (row, field) pairs are gathered.
    Scores s(j) = <c_{i,f}, E_out[j]> + b[j] against an output feature table of its own (``V x
    D_e``) and a bias initialised to ``log q(j) + log V`` (the authors' NCE scorer; at
    initialisation the model's distribution is the noise distribution).

    * ``mtm_loss="nce"`` (Eq. 10): K noise ids per masked pair drawn from the training feature
      frequencies q (``NoiseSampler``; the target may be drawn too, as in the authors' code).
      With the model's log-probability log p̃(j) = s(j) − log V, the NCE logit is the standard
      Δ(j) = log p̃(j) − log(K q(j)); loss = softplus(−Δ(target)) + Σ_k softplus(Δ(noise_k)),
      i.e. BCE with label 1 for the target and 0 for the noise, averaged over masked pairs.
    * ``mtm_loss="softmax"``: the exact cross-entropy of Eq. 8-9 over the candidate space.

    ``nce_noise`` picks the candidate space of both: ``global`` = the whole feature vocabulary
    (the authors' choice; q = unigram over all fields), ``per_field`` = only the masked field's id
    range (q restricted to the field and renormalised; softmax restricted to the field).

ICL, Eq. 11 (``IclObjective``)
    z_text = W_t [CLS], z_tab = W_v v (two linear layers to ``projection_dim``, as in the paper;
    ``head="clip"`` gives the authors' residual MLP heads ending in a LayerNorm). Symmetric
    InfoNCE at temperature τ with dot-product similarity (paper) or cosine (option). Under
    ``torch.distributed`` the negatives are gathered from all ranks with an autograd all-gather
    (``_gather_keep_local``): every rank's block carries its gradient back to its rank (the
    authors' code and open_clip's default keep only the local block's); with each rank's loss
    scaled by ``world · n_local / n_global`` and DDP's gradient average, N ranks compute the
    gradient of one process on the global batch.

"w/o joint reconstruction" (``joint=False``): MLM predicts the masked tokens from ŵ alone (the
head's v input is removed) and MTM reconstructs from v̂ alone (no cross-attention; the field
heads get v̂ only). Heads, scorer and losses are otherwise unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flip.align.masking import IGNORE_INDEX
from flip.errors import SettingError
from flip.models.layers import sparse_rows

NOISE_FLOOR = 1e-10  # q(j) is clamped here (then renormalised): ids never seen in training


# =========================================================================================== MLM
class MlmHead(nn.Module):
    """g_PLM (Eq. 5): ``[h ⊕ v]`` (M, D_t + D_v) -> vocabulary logits (M, V_t). ``D_v = 0``: h only."""

    def __init__(self, text_dim: int, tab_dim: int, vocab_size: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.tab_dim = tab_dim
        self.dense = nn.Linear(text_dim + tab_dim, text_dim)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(text_dim, vocab_size)

    def forward(self, h: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([h, v], dim=-1) if self.tab_dim else h  # (M, D_t [+ D_v])
        return self.decoder(self.dropout(torch.tanh(self.dense(x))))  # (M, V_t)


def mlm_loss(head: MlmHead, states: torch.Tensor, v: torch.Tensor | None, labels: torch.Tensor,
             index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 6: mean cross-entropy over the masked tokens of the batch.

    ``states`` (B, L, D_t) token states of the MASKED text (ŵ), ``v`` (B, D_v) representation of
    the COMPLETE table (None without joint reconstruction), ``labels`` (B, L): original token id
    at masked positions, -100 elsewhere; ``index`` (2, M): the masked positions (row, column), when
    found beforehand (on the host: then nothing here waits for the device). Returns ``loss``, ``acc``
    (top-1 over masked tokens), ``count`` (M).
    """
    if index is None:
        index = (labels != IGNORE_INDEX).nonzero().t()
    rows, cols = index[0], index[1]  # (M,), (M,)
    target = labels[rows, cols]  # (M,)
    if rows.numel() == 0:
        zero = states.sum() * 0.0 + sum(p.sum() for p in head.parameters()) * 0.0
        return {"loss": zero, "acc": zero.detach(), "count": rows.new_zeros(())}
    h = states[rows, cols]  # (M, D_t)
    logits = head(h, v[rows] if head.tab_dim else None).float()  # (M, V_t)
    loss = F.cross_entropy(logits, target)
    acc = (logits.detach().argmax(-1) == target).float().mean()
    return {"loss": loss, "acc": acc, "count": rows.new_full((), rows.numel())}


class MlmObjective(nn.Module):
    """Masked language modelling with the complete table as reference answer (§3.3.3)."""

    def __init__(self, text_dim: int, tab_dim: int, vocab_size: int, joint: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        self.joint = joint
        self.head = MlmHead(text_dim, tab_dim if joint else 0, vocab_size, dropout)

    def forward(self, masked_states: torch.Tensor, v: torch.Tensor | None, labels: torch.Tensor,
                index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return mlm_loss(self.head, masked_states, v if self.joint else None, labels, index)


# =========================================================================================== MTM
class CrossAttention(nn.Module):
    """Eq. 7: ``u = softmax(v̂ Q wᵀ / sqrt(D_t)) w``, one query per row, padding masked out.

    ``Q`` (D_v, D_t) trainable. ``v_hat`` (B, D_v), ``w`` (B, L, D_t), ``attention_mask`` (B, L)
    (1 = token) -> ``u`` (B, D_t) (and the attention weights (B, L) with ``return_weights``).
    """

    def __init__(self, tab_dim: int, text_dim: int) -> None:
        super().__init__()
        self.text_dim = text_dim
        self.Q = nn.Parameter(torch.empty(tab_dim, text_dim))
        nn.init.xavier_normal_(self.Q)

    def forward(self, v_hat: torch.Tensor, w: torch.Tensor, attention_mask: torch.Tensor,
                return_weights: bool = False):
        query = v_hat @ self.Q  # (B, D_t)
        scores = torch.einsum("bd,bld->bl", query, w) / math.sqrt(self.text_dim)  # (B, L)
        scores = scores.float().masked_fill(attention_mask == 0, float("-inf"))
        weights = scores.softmax(dim=-1).to(w.dtype)  # (B, L)
        u = torch.einsum("bl,bld->bd", weights, w)  # (B, D_t)
        return (u, weights) if return_weights else u


class FieldHeads(nn.Module):
    """F independent two-layer MLPs g^(f): (in) -> ReLU(hidden) -> (out), stored as batched weights.

    ``forward(h, rows, fields)``: ``h`` (B, in), ``rows``/``fields`` (M,) the masked pairs ->
    (M, out) = g^(fields[m])(h[rows[m]]). The first layer of all F heads is one matmul
    (B, in) @ (in, F*hidden); the second layer gathers each pair's (hidden, out) weight.
    """

    def __init__(self, num_fields: int, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.num_fields, self.hidden_dim = num_fields, hidden_dim
        self.w1 = nn.Parameter(torch.empty(in_dim, num_fields, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(num_fields, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_fields, hidden_dim, out_dim))
        self.b2 = nn.Parameter(torch.zeros(num_fields, out_dim))
        std1 = math.sqrt(2.0 / (in_dim + hidden_dim))  # xavier-normal per head
        std2 = math.sqrt(2.0 / (hidden_dim + out_dim))
        nn.init.normal_(self.w1, std=std1)
        nn.init.normal_(self.w2, std=std2)

    def forward(self, h: torch.Tensor, rows: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        B = h.shape[0]
        first = (h @ self.w1.flatten(1)).view(B, self.num_fields, self.hidden_dim)  # (B, F, H)
        hid = torch.relu(first[rows, fields] + self.b1[fields])  # (M, H)
        return torch.einsum("mh,mho->mo", hid, self.w2[fields]) + self.b2[fields]  # (M, out)


class NoiseSampler(nn.Module):
    """Draws NCE noise ids from the training feature frequencies, globally or within a field.

    ``counts`` (V,) training-split frequency of every global id; ``field_ranges`` list of
    ``(offset, size)`` per field (the field owns ids ``offset .. offset+size-1``).
    ``log_q`` (V,) is the log noise probability of each id under the chosen mode: global
    ``q(j) = c_j / Σ c`` or per field ``q(j) = c_j / Σ_{field(j)} c`` (fields partition the ids, so
    each id has one). Sampling is inverse-CDF on the cumulative counts (``searchsorted``), no
    per-field Python loop; ids with zero count are never drawn.
    """

    def __init__(self, counts: torch.Tensor, field_ranges: list[tuple[int, int]], mode: str = "global") -> None:
        super().__init__()
        if mode not in ("global", "per_field"):
            raise SettingError(f"pretrain.nce_noise must be global or per_field, got {mode!r}")
        counts = torch.as_tensor(counts, dtype=torch.float64).clamp_min(0)
        V = counts.numel()
        self.mode = mode
        cdf = counts.cumsum(0)
        lo = torch.tensor([0.0 if o == 0 else float(cdf[o - 1]) for o, _ in field_ranges], dtype=torch.float64)
        hi = torch.tensor([float(cdf[o + s - 1]) for o, s in field_ranges], dtype=torch.float64)
        if mode == "global":
            total = float(cdf[-1])
            if total <= 0:
                raise ValueError("feature counts are all zero")
            lo.zero_()
            hi.fill_(total)
            q = counts / total
        else:
            if (hi <= lo).any():
                empty = [i for i in range(len(field_ranges)) if hi[i] <= lo[i]]
                raise ValueError(f"fields {empty} have no training counts: per_field noise impossible")
            q = torch.zeros(V, dtype=torch.float64)
            for (o, s), a, b in zip(field_ranges, lo, hi):
                q[o:o + s] = counts[o:o + s] / (b - a)
        q = q.clamp_min(NOISE_FLOOR)
        if mode == "global":
            q = q / q.sum()
        self.register_buffer("cdf", cdf, persistent=False)
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("hi", hi, persistent=False)
        self.register_buffer("log_q", q.log().float(), persistent=False)
        self.register_buffer("id_lo", torch.tensor([o for o, _ in field_ranges]), persistent=False)
        self.register_buffer("id_hi", torch.tensor([o + s - 1 for o, s in field_ranges]), persistent=False)

    def uniforms(self, pairs: int, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The (pairs, num) float64 uniforms that :meth:`sample` turns into noise ids, on the generator's device."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand((pairs, num), generator=generator, device=gen_device, dtype=torch.float64)

    def sample(self, fields: torch.Tensor, num: int, generator: torch.Generator | None = None,
               uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """(M,) field index of each masked pair -> (M, num) noise ids (from ``uniforms``, those of
        :meth:`uniforms` drawn beforehand, or drawn here)."""
        u = self.uniforms(fields.shape[0], num, generator) if uniforms is None else uniforms
        u = u.to(self.cdf.device, non_blocking=True)
        lo, hi = self.lo[fields][:, None], self.hi[fields][:, None]
        ids = torch.searchsorted(self.cdf, lo + u * (hi - lo), right=True)  # first id with cdf > t
        if self.mode == "per_field":
            ids = torch.maximum(torch.minimum(ids, self.id_hi[fields][:, None]), self.id_lo[fields][:, None])
        return ids.clamp_max(self.cdf.numel() - 1)


def nce_loss(delta_pos: torch.Tensor, delta_noise: torch.Tensor) -> torch.Tensor:
    """Eq. 10 with corrected logits: ``mean_m [softplus(−Δ_pos) + Σ_k softplus(Δ_noise_k)]``.

    ``delta_pos`` (M,), ``delta_noise`` (M, K): NCE logits Δ = log p̃ − log(K q). softplus(−x) =
    −log σ(x) and softplus(x) = −log(1 − σ(x)).
    """
    return (F.softplus(-delta_pos) + F.softplus(delta_noise).sum(-1)).mean()


class MtmObjective(nn.Module):
    """Masked tabular modelling (§3.3.4): cross-attention, per-field heads, NCE or softmax loss.

    ``tab_dim`` D_v, ``text_dim`` D_t, ``embed_dim`` D_e (size of the scorer's output feature
    embeddings), ``counts`` (V,) training feature frequencies, ``field_ranges`` [(offset, size)].
    """

    def __init__(self, tab_dim: int, text_dim: int, embed_dim: int, counts: torch.Tensor,
                 field_ranges: list[tuple[int, int]], *, joint: bool = True, loss: str = "nce",
                 noise: str = "global", num_negatives: int = 25, hidden_dim: int = 128) -> None:
        super().__init__()
        if loss not in ("nce", "softmax"):
            raise SettingError(f"pretrain.mtm_loss must be nce or softmax, got {loss!r}")
        if loss == "nce" and num_negatives < 1:
            raise SettingError("pretrain.nce_negatives must be >= 1")
        counts = torch.as_tensor(counts, dtype=torch.float64)
        V = counts.numel()
        self.joint, self.loss_type, self.num_negatives = joint, loss, int(num_negatives)
        self.attention = CrossAttention(tab_dim, text_dim) if joint else None
        self.heads = FieldHeads(len(field_ranges), tab_dim + (text_dim if joint else 0), hidden_dim, embed_dim)
        self.sampler = NoiseSampler(counts, field_ranges, noise)
        self.log_V = math.log(V)
        # NCE scorer (authors' IndexLinear): own output embeddings + bias = log q + log V
        self.out_embedding = nn.Embedding(V, embed_dim)
        nn.init.uniform_(self.out_embedding.weight, -1.0 / math.sqrt(embed_dim), 1.0 / math.sqrt(embed_dim))
        self.out_bias = nn.Parameter(self.sampler.log_q.clone() + self.log_V)  # (V,)
        self.register_buffer("field_of_id", _field_of_id(V, field_ranges), persistent=False)
        self.sparse = False  # use_sparse_gradients: the scorer's tables get row-sparse gradients

    def use_sparse_gradients(self) -> list[nn.Parameter]:
        """NCE: make the scorer's vocabulary tables (``out_embedding``, ``out_bias``) produce row-sparse
        gradients - only the rows of a batch's targets and noise ids - and return them (they then need
        a row-sparse optimizer, ``flip.train.sparse_updates``). The exact softmax scores every id of the
        vocabulary, so its gradients are dense by nature: nothing changes and nothing is returned."""
        if self.loss_type != "nce":
            return []
        self.sparse = True
        self.out_embedding.sparse = True
        return [self.out_embedding.weight, self.out_bias]

    def queries(self, v_hat: torch.Tensor, w: torch.Tensor | None, attention_mask: torch.Tensor | None,
                rows: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """c_{i,f} (M, D_e) for the masked pairs (rows, fields)."""
        if self.joint:
            u = self.attention(v_hat, w, attention_mask)  # (B, D_t)
            h = torch.cat([v_hat, u.to(v_hat.dtype)], dim=-1)  # (B, D_v + D_t)
        else:
            h = v_hat  # (B, D_v)
        return self.heads(h, rows, fields)

    def score(self, c: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """s(j) = <c, E_out[j]> + b[j]: ``c`` (M, D_e), ``ids`` (M, C) -> (M, C)."""
        bias = sparse_rows(self.out_bias, ids) if self.sparse else self.out_bias[ids]
        return torch.einsum("md,mcd->mc", c, self.out_embedding(ids)) + bias

    def forward(self, v_hat: torch.Tensor, w: torch.Tensor | None, attention_mask: torch.Tensor | None,
                x: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator | None = None,
                index: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``v_hat`` (B, D_v) masked-table representation, ``w`` (B, L, D_t) COMPLETE text states,
        ``x`` (B, F) original ids, ``chosen`` (B, F) masked fields -> ``loss``, ``acc``, ``count``.
        ``index`` (2, M) the masked (row, field) pairs and ``noise`` (M, K) the NCE uniforms
        (``NoiseSampler.uniforms``), when drawn beforehand (on the host: nothing here then waits for
        the device); otherwise found and drawn here."""
        if index is None:
            index = chosen.nonzero().t()
        rows, fields = index[0], index[1]  # (M,), (M,)
        if rows.numel() == 0:
            # every parameter in the graph (DDP), except row-sparse tables: a dense zero gradient there
            # would be a dense update over the vocabulary
            skip = {id(self.out_embedding.weight), id(self.out_bias)} if self.sparse else set()
            zero = v_hat.sum() * 0.0 + sum(p.sum() for p in self.parameters() if id(p) not in skip) * 0.0
            return {"loss": zero, "acc": zero.detach(), "count": rows.new_zeros(())}
        target = x[rows, fields]  # (M,)
        c = self.queries(v_hat, w, attention_mask, rows, fields).float()  # (M, D_e)
        if self.loss_type == "softmax":
            logits = c @ self.out_embedding.weight.float().t() + self.out_bias.float()  # (M, V)
            if self.sampler.mode == "per_field":
                logits = logits.masked_fill(self.field_of_id[None, :] != fields[:, None], float("-inf"))
            loss = F.cross_entropy(logits, target)
            acc = (logits.detach().argmax(-1) == target).float().mean()
        else:
            noise = self.sampler.sample(fields, self.num_negatives, generator, noise)  # (M, K)
            ids = torch.cat([target[:, None], noise], dim=1)  # (M, 1 + K)
            s = self.score(c, ids).float()
            delta = s - self.log_V - (math.log(self.num_negatives) + self.sampler.log_q[ids])  # Δ (M, 1 + K)
            loss = nce_loss(delta[:, 0], delta[:, 1:])
            acc = (delta.detach().argmax(-1) == 0).float().mean()
        return {"loss": loss, "acc": acc, "count": rows.new_full((), rows.numel())}


def _field_of_id(vocab_size: int, field_ranges: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.full((vocab_size,), -1, dtype=torch.long)
    for f, (o, s) in enumerate(field_ranges):
        out[o:o + s] = f
    return out


# =========================================================================================== ICL
def _gather_keep_local(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``z`` concatenated in rank order, with gradients flowing to every rank's block.

    Returns (all_z (B_total, d), offset of the local block). Without an initialised process group
    (or with one rank) returns ``(z, 0)``. Ranks may hold different batch sizes. The gather is the
    autograd one (``torch.distributed.nn.functional.all_gather``): its backward sums, on each rank,
    the gradients that every rank's loss sends to that rank's block, so with the loss scaled by
    ``world · n_local / n_global`` and DDP's gradient average, N ranks compute exactly the gradient
    of one process on the global batch. (The authors' code gathers without gradient, keeping only
    the local block's: with the paper's dot-product similarity that partial gradient made ICL
    diverge in a 2-rank run, see tests/train/test_ddp.py.)
    """
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([z.shape[0]], device=z.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_int = [int(s.item()) for s in sizes]
    biggest = max(sizes_int)
    padded = torch.cat([z, z.new_zeros((biggest - z.shape[0], *z.shape[1:]))], dim=0)  # keeps z's graph
    blocks = [b[:n] for b, n in zip(all_gather(padded), sizes_int)]
    return torch.cat(blocks, dim=0), sum(sizes_int[:rank])


def info_nce(z_text: torch.Tensor, z_tab: torch.Tensor, temperature: float, similarity: str = "dot",
             gather: bool = True) -> dict[str, torch.Tensor]:
    """Eq. 11: symmetric InfoNCE between ``z_text`` and ``z_tab`` (B, d); row i matches row i.

    ``similarity``: ``dot`` (paper) or ``cosine`` (L2-normalised first). Returns ``loss`` =
    (CE(text->tab) + CE(tab->text)) / 2 and ``acc`` (mean top-1 retrieval accuracy of both
    directions, over the gathered batch).
    """
    if similarity == "cosine":
        z_text, z_tab = F.normalize(z_text.float(), dim=-1), F.normalize(z_tab.float(), dim=-1)
    elif similarity == "dot":
        z_text, z_tab = z_text.float(), z_tab.float()
    else:
        raise SettingError(f"pretrain.similarity must be dot or cosine, got {similarity!r}")
    all_tab, offset = _gather_keep_local(z_tab) if gather else (z_tab, 0)
    all_text, _ = _gather_keep_local(z_text) if gather else (z_text, 0)
    labels = torch.arange(z_text.shape[0], device=z_text.device) + offset  # (B,)
    logits_t2v = z_text @ all_tab.t() / temperature  # (B, B_total): sim(z_i^text, z_j^tab) / τ
    logits_v2t = z_tab @ all_text.t() / temperature  # (B, B_total): sim(z_i^tab, z_j^text) / τ
    loss = 0.5 * (F.cross_entropy(logits_t2v, labels) + F.cross_entropy(logits_v2t, labels))
    with torch.no_grad():
        acc = 0.5 * ((logits_t2v.argmax(-1) == labels).float().mean() + (logits_v2t.argmax(-1) == labels).float().mean())
    return {"loss": loss, "acc": acc}


class ClipProjection(nn.Module):
    """The authors' projection head (the common "simple CLIP" head), an alternative to a Linear:
    ``p = Linear(in, d)(x); LayerNorm(p + Dropout(Linear(d, d)(GELU(p))))``. (B, in) -> (B, d)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj(x)
        return self.norm(p + self.dropout(self.fc(F.gelu(p))))


class IclObjective(nn.Module):
    """Instance-level contrastive learning (§3.3.5): two projections + symmetric InfoNCE.

    ``head="linear"`` (default): the paper's two linear layers. ``head="clip"``: the authors'
    residual MLP heads ending in a LayerNorm (``ClipProjection``).

    At initialisation the ID embeddings are tiny (``flip.models.layers.EMBEDDING_INIT_STD``), so
    z_tab hardly differs between rows and ICL sits near log(B) for the first few dozen steps of
    joint training; in our runs on the synthetic data the linear head left that plateau sooner than
    the clip head.
    """

    def __init__(self, text_dim: int, tab_dim: int, projection_dim: int = 128, temperature: float = 0.7,
                 similarity: str = "dot", head: str = "linear") -> None:
        super().__init__()
        if temperature <= 0:
            raise SettingError("pretrain.temperature must be > 0")
        if similarity not in ("dot", "cosine"):
            raise SettingError(f"pretrain.similarity must be dot or cosine, got {similarity!r}")
        if head == "linear":
            self.text_proj: nn.Module = nn.Linear(text_dim, projection_dim)
            self.tab_proj: nn.Module = nn.Linear(tab_dim, projection_dim)
        elif head == "clip":
            self.text_proj = ClipProjection(text_dim, projection_dim)
            self.tab_proj = ClipProjection(tab_dim, projection_dim)
        else:
            raise SettingError(f"pretrain.icl_head must be linear or clip, got {head!r}")
        self.temperature, self.similarity = float(temperature), similarity

    def forward(self, cls: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """``cls`` (B, D_t) [CLS] of the complete text, ``v`` (B, D_v) of the complete table."""
        return info_nce(self.text_proj(cls), self.tab_proj(v), self.temperature, self.similarity)


__all__ = ["ClipProjection", "CrossAttention", "FieldHeads", "IclObjective", "MlmHead", "MlmObjective", "MtmObjective",
           "NoiseSampler", "info_nce", "mlm_loss", "nce_loss"]
