"""The ``analyze`` stage: the paper's alignment figures (§4.6), as PNG plus the numbers as JSON.

* **Fig. 5**: for test rows, mask one field f at a time in the text (every value token → mask
  token) and one field g at a time in the table (→ the shared ``[MASK]`` id), project [CLS] and v
  with the pretrained ICL heads, L2-normalise, and average the dot products: an F×F heat map whose
  diagonal should stand out when the two modalities are aligned field by field.
* **Fig. 6**: a 2-D SVD projection of the ID model's feature embedding table, as in the paper: the
  ID model aligned and then finetuned (``flip_id``) against the same model trained from scratch, with
  the table right after alignment (before finetuning) beside them. Of runs of several seeds, the figure
  shows the FIRST seed of ``run.seeds`` of each (:func:`first_seed_weights`,
  :meth:`flip.runs.RunDir.first_seed`): the same seed on both sides, so that the two tables differ by
  the alignment and not by the seed or by a pick on validation (the paper compares one model of each;
  ``flip package`` serves the best validation seed instead, :meth:`~flip.runs.RunDir.best_seed`), and
  the seed learning-rate selection trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flip.errors import FlipError
from flip.io import atomic_dir, write_json
from flip.runs import RunDir


ALIGNED_ONLY = "after alignment only (not finetuned)"


class NoIclHeads(FlipError):
    """Fig. 5 reads the ICL projections, which a "w/o ICL" pretraining does not have."""


def _load_pretrained(pretrained: Path, dataset_dir: Path):
    """Rebuild the pretraining module of a run directory and load its full weights."""
    from safetensors.torch import load_file

    from flip.align.model import AlignmentSpec, FlipPretrainModel, load_feature_counts
    from flip.config import config_from_dict
    from flip.data.tensors import load_meta
    from flip.models import build_id_model
    from flip.models.plm import load_plm

    cfg = config_from_dict(RunDir(pretrained).config())
    meta = load_meta(dataset_dir)
    cfg.plm.name = str(pretrained / "plm")
    plm, tokenizer = load_plm(cfg.plm)
    id_model = build_id_model(cfg.id_model, len(meta["fields"]), meta["vocab_size"])
    model = FlipPretrainModel(id_model, plm, AlignmentSpec.of(cfg.pretrain), meta,
                              load_feature_counts(dataset_dir, meta["vocab_size"]))
    # a retrain that reused an older pretraining: its vocabulary-sized tensors mapped onto this dataset's
    from flip.train.builders import pretrained_rows, remap_rows

    rows = pretrained_rows(pretrained, dataset_dir)

    def state(path: Path) -> dict:
        weights = load_file(str(path))
        return weights if rows is None else remap_rows(weights, pretrained, rows)

    heads = pretrained / "heads.safetensors"  # the heads; the encoders come from id_model.safetensors, plm/
    if heads.exists():
        model.load_state_dict(state(heads), strict=False)
    id_model.load_state_dict(state(pretrained / "id_model.safetensors"))
    model.eval()
    return cfg, meta, model, tokenizer


def field_similarity(pretrained: Path, dataset_dir: Path, rows: int = 256) -> dict[str, Any]:
    """Fig. 5 numbers: S[f, g] = mean_i <z_text(mask f), z_tab(mask g)> over ``rows`` test rows."""
    import torch

    if not RunDir(pretrained).config()["pretrain"]["icl_weight"]:
        raise NoIclHeads("the pretraining run has no ICL heads (pretrain.icl_weight = 0): Fig. 5 needs them")
    cfg, meta, model, tokenizer = _load_pretrained(pretrained, dataset_dir)
    with torch.no_grad():
        return _field_similarity(cfg, meta, model, tokenizer, dataset_dir, rows)


def _field_similarity(cfg: Any, meta: dict[str, Any], model: Any, tokenizer: Any, dataset_dir: Path,
                      rows: int) -> dict[str, Any]:
    import torch

    from flip.align.masking import mask_tabular, mask_text
    from flip.data.tensors import load_tabular
    from flip.data.tokens import tokenize_split

    if model.icl is None:
        raise NoIclHeads("the pretraining run has no ICL heads (pretrain.icl_weight = 0): Fig. 5 needs them")
    tab = load_tabular(dataset_dir, "test").head(rows)
    tokens = tokenize_split(dataset_dir, "test", tokenizer, cfg.plm.max_length, cfg.plm.cache_dir).head(rows)
    batch = tokens.batch(torch.arange(len(tab)))
    x, ids, attn = tab.x.long(), batch["input_ids"].long(), batch["attention_mask"]
    start, end = batch["field_tok_start"], batch["field_tok_end"]
    F = x.shape[1]
    z_text, z_tab = [], []
    for f in range(F):
        chosen = torch.zeros(len(x), F, dtype=torch.bool)
        chosen[:, f] = True
        masked, _ = mask_text(ids, start, end, chosen, model.plm.mask_token_id)
        sentence = model.plm.sentence(model.plm(masked, attn), attn)
        z_text.append(torch.nn.functional.normalize(model.icl.text_proj(sentence), dim=-1))
        v_hat = model.id_model.encode(mask_tabular(x, chosen, model.mask_id))
        z_tab.append(torch.nn.functional.normalize(model.icl.tab_proj(v_hat), dim=-1))
    sim = torch.stack([torch.stack([(zt * zb).sum(-1).mean() for zb in z_tab]) for zt in z_text])  # (F, F)
    names = [f["name"] for f in meta["fields"]]
    s = sim.numpy()
    return {"fields": names, "similarity": s.round(5).tolist(), "rows": len(x),
            "diagonal_mean": float(np.diag(s).mean()), "off_diagonal_mean": float(s[~np.eye(F, dtype=bool)].mean()),
            "diagonal_is_row_max": int(sum(int(np.argmax(s[i]) == i) for i in range(F)))}


def embedding_svd(weights: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """Fig. 6 numbers: 2-D SVD coordinates of every real feature embedding, with its field."""
    rows, field_of = [], []
    for k, f in enumerate(meta["fields"]):
        ids = np.arange(f["offset"] + 1, f["offset"] + f["size"])
        rows.append(ids)
        field_of += [k] * len(ids)
    ids = np.concatenate(rows)
    e = weights[ids] - weights[ids].mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(e, full_matrices=False)
    coords = u[:, :2] * s[:2]
    share = (s**2 / (s**2).sum())
    return {"coords": coords.astype(np.float32), "field": np.array(field_of), "singular_values": s[:8].tolist(),
            "explained_2d": float(share[:2].sum()),
            # effective rank (exp of the entropy of the normalised spectrum): low = collapsed into a narrow cone
            "effective_rank": float(np.exp(-(share * np.log(share + 1e-12)).sum()))}


def first_seed_weights(run: Path) -> Path | None:
    """The weights of a finetune run's first seed of ``run.seeds`` (what Fig. 6 shows: see the module
    docstring), or None when the run has no finished seed with weights."""
    seeds = RunDir(run).seeds()
    first = next(iter(seeds.values()), None)
    return first.weights_file if first is not None and first.weights_file.exists() else None


def _plot_fig5(plt: Any, sim: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    im = ax.imshow(np.array(sim["similarity"]), cmap="viridis")
    ax.set_xticks(range(len(sim["fields"])), [f"Tab-{n}" for n in sim["fields"]], rotation=60, ha="right",
                  fontsize=7)
    ax.set_yticks(range(len(sim["fields"])), [f"Text-{n}" for n in sim["fields"]], fontsize=7)
    ax.set_title("Fig. 5: text vs table similarity,\none field masked in each", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "fig5_field_similarity.png", dpi=110)
    plt.close(fig)


def analyze(dataset_dir: Path, pretrained: Path, out_dir: Path, *, extra_runs: dict[str, Path] | None = None,
            rows: int = 256) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.numpy import load_file

    from flip.data.tensors import load_meta

    dataset_dir, pretrained, out_dir = Path(dataset_dir), Path(pretrained), Path(out_dir)
    if not (pretrained / "id_model.safetensors").exists():
        raise FlipError(f"{pretrained} holds no pretraining run: run `flip pretrain` first")
    meta = load_meta(dataset_dir)
    result: dict[str, Any] = {}
    from flip.train.builders import pretrained_rows

    vocab_rows = pretrained_rows(pretrained, dataset_dir)  # a retrain that reused an older pretraining
    with atomic_dir(out_dir, "analyze", ("fig5_*.png", "fig6_*.png", "analysis.json")) as tmp:
        try:
            sim = field_similarity(pretrained, dataset_dir, rows)
        except NoIclHeads as exc:  # the "w/o ICL" ablation: Fig. 5 needs the ICL projections
            sim = None
            result["fig5"] = {"skipped": str(exc)}
        if sim is not None:
            result["fig5"] = {k: v for k, v in sim.items()}
            _plot_fig5(plt, sim, tmp)

        runs = {**{k: Path(v) for k, v in (extra_runs or {}).items()}, ALIGNED_ONLY: pretrained / "id_model.safetensors"}
        runs = {k: p for k, p in runs.items() if p.exists()}
        fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), squeeze=False)
        result["fig6"] = {}
        for ax, (name, path) in zip(axes[0], runs.items()):
            state = load_file(str(path))
            if name == ALIGNED_ONLY and vocab_rows is not None:  # its rows for this dataset's feature ids
                old = int(json.loads((pretrained / "dataset_meta.json").read_text())["vocab_size"])
                state = {k: (v[vocab_rows.numpy()] if v.ndim >= 1 and v.shape[0] == old else v)
                         for k, v in state.items()}
            key = next(k for k in state if k.endswith("embedding.weight") and state[k].ndim == 2
                       and state[k].shape[0] == meta["vocab_size"] and state[k].shape[1] > 1)
            svd = embedding_svd(state[key], meta)
            result["fig6"][name] = {k: svd[k] for k in ("singular_values", "explained_2d", "effective_rank")}
            colours = plt.get_cmap("tab10")
            for k, f in enumerate(meta["fields"]):
                sel = svd["field"] == k
                ax.scatter(svd["coords"][sel, 0], svd["coords"][sel, 1], s=3, color=colours(k % 10), label=f["name"])
            ax.set_title(f"{name}\neffective rank {svd['effective_rank']:.1f}", fontsize=9)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, markerscale=3,
                   title="field")
        fig.suptitle("Fig. 6: 2-D SVD of the feature ID embeddings")
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        fig.savefig(tmp / "fig6_embedding_svd.png", dpi=110)
        plt.close(fig)
        write_json(tmp / "analysis.json", result)
    return result
