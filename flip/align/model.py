"""The FLIP modality-alignment pretraining module (paper §3.3): masking + encoders + MLM/MTM/ICL.

    model = FlipPretrainModel(id_model, plm, AlignmentSpec.of(cfg.pretrain), meta, load_feature_counts(dataset_dir))
    out = model(pretrain_batch(tab.x, tokens, idx, device), generator=g)
    out["loss"].backward()      # w_mlm·MLM + w_mtm·MTM + w_icl·ICL; out["mlm"], out["mtm_acc"], ... for logs

One ``forward`` call does, for a batch of B rows:

1. **Masking** (``flip.align.masking``, with the given ``torch.Generator``): text fields among
   those whose value tokens survived truncation, tabular fields among the non-padding ones;
   ``same_fields`` reuses the text choice for the table (``text_mask_ratio`` then decides both).
   ``field_level_masking=False`` masks as many random non-special tokens per row as the
   field-level choice would have.
2. **Encoding** (Eq. 4), each pass run only if some enabled objective needs it:
   PLM on the complete text once (its [CLS] for ICL, its token states w for MTM's
   cross-attention) and on the masked text once (ŵ for MLM) - or both in one call over
   [complete; masked] (``one_text_pass``: the same function; under dropout the masks are drawn
   in another order, so a training run differs by RNG noise); the ID model on the complete
   table (v for MLM and ICL) and on the masked table (v̂ for MTM).
3. **Losses** (``flip.align.objectives``): ``loss = mlm_weight·MLM + mtm_weight·MTM +
   icl_weight·ICL``. An objective with weight 0 is neither built nor computed (no parameters, no
   encoder pass it alone would need): the CTRL baseline is ``mlm_weight=0, mtm_weight=0,
   icl_weight=1``. With ``joint_reconstruction=False`` MLM does not see v and MTM does not see w
   (ablation "w/o joint reconstruction").

Returned dict: ``loss`` (with grad) and, detached, for every enabled objective ``<name>`` (its
loss), ``<name>_acc`` (MLM: top-1 over masked tokens; MTM: NCE = target ranked first among
1 + K candidates, softmax = top-1 over the candidate space; ICL: top-1 retrieval, both
directions), and ``mlm_tokens`` / ``mtm_fields`` (number of masked tokens / fields).

Submodules: ``id_model``, ``plm`` (``PlmEncoder``), ``mlm``, ``mtm``, ``icl``. Finetuning loads
the two encoders separately: ``id_model_state()`` / ``plm_state()`` (or ``split_state_dict`` on a
saved full state dict; or ``save_parts``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flip.align.masking import (
    IGNORE_INDEX,
    choose_fields,
    field_token_mask,
    mask_random_tokens,
    mask_tabular,
    mask_text,
    maskable_tokens,
)
from flip.align.objectives import IclObjective, MlmObjective, MtmObjective
from flip.errors import SettingError
from flip.models.layers import HEAD_MODULES

OBJECTIVES = ("mlm", "mtm", "icl")
BATCH_KEYS = ("x", "input_ids", "attention_mask", "field_tok_start", "field_tok_end")


@dataclasses.dataclass(frozen=True)
class AlignmentSpec:
    """What the pretraining module is: its masking, its objectives and their heads. These are keys of
    ``pretrain`` in ``params.yaml`` (documented in ``flip.config.PretrainConfig``); the rest of that
    section (rates, epochs, batch size, precision) is the optimiser's, which the module never sees."""

    text_mask_ratio: float
    tab_mask_ratio: float
    same_fields: bool
    field_level_masking: bool
    joint_reconstruction: bool
    mlm_weight: float
    mtm_weight: float
    icl_weight: float
    nce_negatives: int
    nce_noise: str
    mtm_loss: str
    temperature: float
    similarity: str
    icl_head: str
    projection_dim: int

    @classmethod
    def of(cls, settings: Any) -> AlignmentSpec:
        """The spec's keys of ``settings`` (a ``PretrainConfig``, or a spec)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def load_feature_counts(dataset_dir: str | os.PathLike, vocab_size: int | None = None) -> torch.Tensor:
    """``feature_counts.parquet`` (columns id, count) -> dense (vocab_size,) float64 counts."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(dataset_dir) / "feature_counts.parquet", columns=["id", "count"])
    ids = torch.from_numpy(table.column("id").to_numpy().astype("int64"))
    counts = torch.from_numpy(table.column("count").to_numpy().astype("float64"))
    size = int(vocab_size) if vocab_size is not None else int(ids.max()) + 1 if ids.numel() else 0
    out = torch.zeros(size, dtype=torch.float64)
    keep = ids < size
    out[ids[keep]] = counts[keep]
    return out


def pretrain_batch(x: torch.Tensor, tokens: Any, idx: torch.Tensor, device: torch.device | str | None = None,
                   trim: bool = True) -> dict[str, torch.Tensor]:
    """The batch ``FlipPretrainModel`` expects, for rows ``idx`` of a split.

    ``x`` (N, F) ids of the split (``flip.data.tensors.load_tabular(...).x``), ``tokens`` its
    ``flip.data.tokens.TokenizedSplit``. Trailing all-padding token columns are trimmed.
    """
    batch = tokens.batch(idx, trim=trim)  # rows given on the CPU: the trim width is a host max (no sync)
    rows = idx if isinstance(idx, slice) or idx.device == x.device else idx.to(x.device, non_blocking=True)
    batch["x"] = x[rows].long()
    if device is not None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def _non_embedding_params(module: nn.Module) -> int:
    emb = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in module.parameters() if id(p) not in emb)


class FlipPretrainModel(nn.Module):
    """FLIP pretraining: ID model + PLM + the enabled objective heads (see the module docstring).

    ``id_model``: an ``IdModel`` (``.embedding``, ``.encode(x) -> (B, output_dim)``), ``plm``: a
    ``PlmEncoder``, ``spec``: an :class:`AlignmentSpec` (or a ``PretrainConfig``, of which the module
    keeps the spec alone), ``meta``: the dataset's ``meta.json`` dict
    (``fields`` with ``offset``/``size``, ``vocab_size``, ``pad_id``, ``mask_id``),
    ``feature_counts``: (vocab_size,) training frequency of every global id (NCE noise).
    """

    def __init__(self, id_model: nn.Module, plm: nn.Module, spec: AlignmentSpec | Any, meta: dict[str, Any],
                 feature_counts: torch.Tensor | Any, one_text_pass: bool = False) -> None:
        super().__init__()
        # True: the complete and the masked text go through the PLM in one call (``pretrain.one_text_pass``)
        self.one_text_pass = bool(one_text_pass)
        cfg = self.spec = AlignmentSpec.of(spec)
        weights = {name: float(getattr(cfg, f"{name}_weight")) for name in OBJECTIVES}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise SettingError(f"pretrain.mlm_weight, mtm_weight and icl_weight must be >= 0 and not all 0, got {weights}")
        self.weights = weights
        self.id_model = id_model
        self.plm = plm
        fields = meta["fields"]
        self.num_fields = len(fields)
        self.pad_id = int(meta.get("pad_id", 0))
        self.mask_id = int(meta.get("mask_id", 1))
        vocab_size = int(meta["vocab_size"])
        joint = bool(cfg.joint_reconstruction)
        tab_dim, text_dim = int(id_model.output_dim), int(plm.hidden_size)

        self.mlm = MlmObjective(text_dim, tab_dim, plm.vocab_size, joint=joint) if weights["mlm"] > 0 else None
        self.mtm = None
        if weights["mtm"] > 0:
            counts = torch.zeros(vocab_size, dtype=torch.float64)
            given = torch.as_tensor(feature_counts, dtype=torch.float64).flatten()[:vocab_size]
            counts[: given.numel()] = given
            self.mtm = MtmObjective(
                tab_dim, text_dim, int(id_model.embedding.embedding_dim), counts,
                [(int(f["offset"]), int(f["size"])) for f in fields],
                joint=joint, loss=cfg.mtm_loss, noise=cfg.nce_noise, num_negatives=int(cfg.nce_negatives),
            )
        # ``pretrain.icl_head``: "linear" = the paper, "clip" = the authors' code
        self.icl = (IclObjective(text_dim, tab_dim, int(cfg.projection_dim), float(cfg.temperature), cfg.similarity,
                                 head=cfg.icl_head)
                    if weights["icl"] > 0 else None)
        self.register_buffer("special_ids", torch.tensor(list(plm.special_token_ids), dtype=torch.long),
                             persistent=False)

    def use_sparse_gradients(self) -> list[nn.Parameter]:
        """Row-sparse gradients for the vocabulary tables: the ID model's (``IdModel.use_sparse_gradients``)
        and MTM's NCE scorer's (``MtmObjective.use_sparse_gradients``); returns the trainable ones."""
        tables = self.id_model.use_sparse_gradients()
        if self.mtm is not None:
            tables += self.mtm.use_sparse_gradients()
        return [t for t in tables if t.requires_grad]

    # ------------------------------------------------------------------------------- masking
    def mask(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the masks of one batch: ``text_fields``/``tab_fields`` (B, F) bool,
        ``masked_ids``/``mlm_labels`` (B, L) and ``x_masked`` (B, F), for the enabled objectives."""
        cfg = self.spec
        x = batch["x"]
        B, F = x.shape
        out: dict[str, torch.Tensor] = {}
        need_text = self.mlm is not None or (self.mtm is not None and cfg.same_fields)
        if need_text:
            available = batch["field_tok_end"] > batch["field_tok_start"]  # (B, F) not truncated
            out["text_fields"] = choose_fields(B, F, cfg.text_mask_ratio, generator, available)
        if self.mlm is not None:
            ids, start, end = batch["input_ids"], batch["field_tok_start"], batch["field_tok_end"]
            if cfg.field_level_masking:
                masked, labels = mask_text(ids, start, end, out["text_fields"], self.plm.mask_token_id)
            else:  # ablation: as many random tokens per row as the field-level choice covers
                count = field_token_mask(start, end, out["text_fields"], ids.shape[1]).sum(dim=1)  # (B,)
                candidates = maskable_tokens(ids, batch["attention_mask"], self.special_ids)
                masked, labels = mask_random_tokens(ids, candidates, count, self.plm.mask_token_id, generator)
            out["masked_ids"], out["mlm_labels"] = masked, labels
        if self.mtm is not None:
            real = x != self.pad_id
            if cfg.same_fields:
                out["tab_fields"] = out["text_fields"] & real
            else:
                out["tab_fields"] = choose_fields(B, F, cfg.tab_mask_ratio, generator, real)
            out["x_masked"] = mask_tabular(x, out["tab_fields"], self.mask_id)
        return out

    def mask_indices(self, masks: dict[str, torch.Tensor], generator: torch.Generator | None = None
                     ) -> dict[str, torch.Tensor]:
        """What ``forward`` would otherwise find and draw on the device, taken from ``masks`` (those of
        :meth:`mask`) where they are: ``mlm_index`` (2, M) the masked token positions, ``mtm_index``
        (2, P) the masked (row, field) pairs, and ``mtm_noise`` (P, K) the NCE noise uniforms drawn
        from ``generator`` (in the order ``forward`` draws them). Computed on the host before the
        batch is copied to the device, they make a training step free of device-to-host waits."""
        out: dict[str, torch.Tensor] = {}
        if "mlm_labels" in masks:
            out["mlm_index"] = (masks["mlm_labels"] != IGNORE_INDEX).nonzero().t()
        if "tab_fields" in masks:
            out["mtm_index"] = masks["tab_fields"].nonzero().t()
            if self.mtm is not None and self.mtm.loss_type == "nce":
                out["mtm_noise"] = self.mtm.sampler.uniforms(out["mtm_index"].shape[1], self.mtm.num_negatives,
                                                             generator)
        return out

    # ------------------------------------------------------------------------------- forward
    @property
    def passes(self) -> dict[str, bool]:
        """Which encoder passes ``forward`` runs (the enabled objectives decide): the PLM on the complete
        text (``plm``: w for ICL and joint MTM) and on the masked text (``plm_masked``: ŵ for MLM), the ID
        model on the complete table (``id``: v for ICL and joint MLM) and on the masked one (``id_masked``:
        v̂ for MTM). Used by ``forward``, :meth:`flops_per_sample` and DDP (an encoder no pass uses has
        parameters without gradient)."""
        return {
            "plm": self.icl is not None or (self.mtm is not None and self.mtm.joint),
            "plm_masked": self.mlm is not None,
            "id": self.icl is not None or (self.mlm is not None and self.mlm.joint),
            "id_masked": self.mtm is not None,
        }

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``batch``: ``x`` (B, F) ids, ``input_ids``/``attention_mask`` (B, L) of the complete
        text, ``field_tok_start``/``field_tok_end`` (B, F). ``masks``: those of :meth:`mask` for this
        batch (drawn elsewhere, e.g. on the host or on the global batch of a distributed step), with
        or without :meth:`mask_indices`; None: drawn here from ``generator``. Returns the losses
        (module docstring)."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"pretraining batch lacks {missing}")
        x, ids, attn = batch["x"].long(), batch["input_ids"].long(), batch["attention_mask"]
        batch = {**batch, "x": x, "input_ids": ids}
        m = self.mask(batch, generator) if masks is None else masks

        passes = self.passes
        w_hat = None
        if self.one_text_pass and passes["plm"] and passes["plm_masked"]:  # [complete; masked] in one call
            both = self.plm(torch.cat([ids, m["masked_ids"]]), torch.cat([attn, attn]))
            w, w_hat = both[: ids.shape[0]], both[ids.shape[0]:]
        else:
            w = self.plm(ids, attn) if passes["plm"] else None  # (B, L, D_t) complete text
        v = self.id_model.encode(x) if passes["id"] else None  # (B, D_v) complete table

        results: dict[str, dict[str, torch.Tensor]] = {}
        if self.mlm is not None:
            if w_hat is None:
                w_hat = self.plm(m["masked_ids"], attn)  # (B, L, D_t) masked text
            results["mlm"] = self.mlm(w_hat, v, m["mlm_labels"], m.get("mlm_index"))
        if self.mtm is not None:
            v_hat = self.id_model.encode(m["x_masked"])  # (B, D_v) masked table
            results["mtm"] = self.mtm(v_hat, w, attn, x, m["tab_fields"], generator, m.get("mtm_index"),
                                      m.get("mtm_noise"))
        if self.icl is not None:
            results["icl"] = self.icl(self.plm.sentence(w, attn), v)

        loss = sum(self.weights[name] * r["loss"] for name, r in results.items())
        out: dict[str, torch.Tensor] = {"loss": loss}
        for name, r in results.items():
            out[name] = r["loss"].detach()
            out[f"{name}_acc"] = r["acc"].detach()
        if "mlm" in results:
            out["mlm_tokens"] = results["mlm"]["count"]
        if "mtm" in results:
            out["mtm_fields"] = results["mtm"]["count"]
        return out

    def flops_per_sample(self, tokens: float, masked_tokens: float, masked_fields: float, batch_size: int) -> float:
        """Analytic training FLOPs of one sample (forward + backward = 3 x forward), matmuls only.

        With ``T`` real tokens per sample, ``P_t`` the PLM's non-embedding parameters, ``n`` its
        layers, ``d`` its width, ``P_v`` the ID model's non-embedding parameters (embedding lookups
        are free), ``D_v`` = dim of v, ``V_t`` the text vocabulary, ``m`` masked tokens and ``k``
        masked fields per sample, ``K`` NCE noise ids, ``D_e`` the ID embedding size, ``p`` the ICL
        projection size, ``B`` the global batch:

            fwd = a·(2·P_t·T + 4·n·T²·d)                                   PLM passes (a = 1 or 2)
                + b·2·P_v                                                  ID passes (b = 1 or 2)
                + m·2·((d + D_v)·d + d·V_t)                                MLM head on masked tokens
                + 2·D_v·d + 4·T·d + 2·F·(D_v + d)·H + k·2·(H·D_e + (1+K)·D_e)   MTM
                + 2·p·(d + D_v) + 4·B·p                                    ICL projections + logits
            FLOPs/sample = 3 · fwd

        ``4·n·T²·d`` is the attention score and weighted-sum matmuls. Padding tokens are not counted,
        so MFU computed from this is conservative.
        """
        model, passes = self, self.passes
        plm, idm = model.plm, model.id_model
        d = int(plm.hidden_size)
        layers = int(getattr(getattr(getattr(plm, "model", None), "config", None), "num_hidden_layers", 0) or 0)
        P_t = _non_embedding_params(plm)
        P_v = _non_embedding_params(idm)
        for name in HEAD_MODULES:  # the frozen prediction layer does not run
            m = getattr(idm, name, None)
            if isinstance(m, nn.Module):
                P_v -= _non_embedding_params(m)
        D_v = int(idm.output_dim)
        T = float(tokens)
        plm_pass = 2.0 * P_t * T + 4.0 * layers * T * T * d
        plm_passes = int(passes["plm"]) + int(passes["plm_masked"])
        id_passes = int(passes["id"]) + int(passes["id_masked"])
        fwd = plm_passes * plm_pass if plm_passes else 0.0
        fwd += id_passes * 2.0 * P_v if id_passes else 0.0
        if model.mlm is not None:
            fwd += masked_tokens * 2.0 * _non_embedding_params(model.mlm)
        if model.mtm is not None:
            heads = model.mtm.heads
            F_, H = int(heads.num_fields), int(heads.hidden_dim)
            De = int(model.mtm.out_embedding.embedding_dim)
            in_dim = int(heads.w1.shape[0])
            fwd += (2.0 * D_v * d + 4.0 * T * d) if model.mtm.joint else 0.0
            fwd += 2.0 * in_dim * F_ * H + masked_fields * 2.0 * (H * De + (1 + model.mtm.num_negatives) * De)
        if model.icl is not None:
            p = int(model.spec.projection_dim)
            fwd += 2.0 * p * (d + D_v) + 4.0 * batch_size * p
        return 3.0 * fwd

    # --------------------------------------------------------------------------- checkpoints
    def id_model_state(self) -> dict[str, torch.Tensor]:
        """State dict of the ID model alone (keys as ``IdModel.state_dict()``)."""
        return self.id_model.state_dict()

    def plm_state(self) -> dict[str, torch.Tensor]:
        """State dict of the ``PlmEncoder`` alone (keys ``model.*``; load into ``load_plm``'s encoder)."""
        return self.plm.state_dict()

    @staticmethod
    def split_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """A full ``FlipPretrainModel`` state dict -> {"id_model": ..., "plm": ..., "heads": ...}
        with the prefixes ``id_model.`` / ``plm.`` stripped (heads keep their full keys)."""
        parts: dict[str, dict[str, torch.Tensor]] = {"id_model": {}, "plm": {}, "heads": {}}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head in ("id_model", "plm"):
                parts[head][rest] = value
            else:
                parts["heads"][key] = value
        return parts

    def save_parts(self, directory: str | os.PathLike) -> Path:
        """Write ``id_model.safetensors`` and the PLM in Hugging Face format under ``plm/``."""
        from safetensors.torch import save_file

        from flip.io import atomic_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.id_model_state().items()}
        with atomic_file(directory / "id_model.safetensors") as tmp:
            save_file(state, str(tmp))
        self.plm.save_pretrained(directory / "plm")
        return directory


def keep_heads_only(run_dir: Path, result: Any = None) -> Any:
    """Store each weight of a finished pretraining run once: the encoders are in ``id_model.safetensors``
    and ``plm/``, so the loop's whole-module ``model.safetensors`` becomes ``heads.safetensors`` (the
    MLM, MTM and ICL heads). Idempotent; returns ``result`` (so a caller can ``return`` through it)."""
    from safetensors.torch import load_file, save_file

    from flip.io import atomic_file

    full = Path(run_dir) / "model.safetensors"
    if full.exists():
        heads = FlipPretrainModel.split_state_dict(load_file(str(full)))["heads"]
        with atomic_file(Path(run_dir) / "heads.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp))
        full.unlink()
    return result


__all__ = ["AlignmentSpec", "FlipPretrainModel", "keep_heads_only", "load_feature_counts", "pretrain_batch"]
