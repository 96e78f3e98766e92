"""Property-style: valid MovieLens-1M files corrupted at random (byte flips, truncation at a random
offset, duplicated or dropped lines, re-encodings) either load into splits that keep the contract
(types, id domains, labels, the published time range, no broken text) or stop with exit code 2, one
paragraph and no output. A traceback, or any other exit code, fails. Seeded and bounded in time."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers import write_ml1m
from flip.cli import app
from flip.data.schemas import validate_processed

pytestmark = pytest.mark.slow
BUDGET_S = float(os.environ.get("FLIP_CORRUPTION_SECONDS", "45"))  # more for a longer hunt
FILES = ("ratings.dat", "users.dat", "movies.dat")
ML1M_TIME = (956_703_932, 1_046_454_590)


def flip_byte(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def duplicate_line(data: bytes, rng: random.Random) -> bytes:
    lines = data.splitlines(keepends=True)
    if not lines:
        return data
    i = rng.randrange(len(lines))
    return b"".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])


def drop_line(data: bytes, rng: random.Random) -> bytes:
    lines = data.splitlines(keepends=True)
    if not lines:
        return data
    i = rng.randrange(len(lines))
    return b"".join(lines[:i] + lines[i + 1:])


def reencode(data: bytes, rng: random.Random) -> bytes:
    text = data.decode("latin-1")
    return text.encode(rng.choice(["utf-8", "utf-16", "utf-16-le", "cp1252"]), errors="replace")


CORRUPTIONS = [flip_byte, truncate, duplicate_line, drop_line, reencode]


def check_contract(out: Path) -> None:
    meta = json.loads((out / "meta.json").read_text())
    validate_processed(out, meta)  # types, id domains, labels, keys, time order, disjoint splits
    for split in ("train", "valid", "test"):
        df = pd.read_parquet(out / f"{split}.parquet", columns=["timestamp", "text"])
        assert df["timestamp"].between(*ML1M_TIME).all(), "a timestamp outside ML-1M's published period"
        assert not df["text"].str.contains("\ufffd|Ã[\u0080-\u00bf]", regex=True).any(), "broken text"


def test_random_corruptions_load_cleanly_or_fail_cleanly(tmp_path):
    runner = CliRunner()
    rng = random.Random(int(os.environ.get("FLIP_CORRUPTION_SEED", "20261129")))
    started, cases, outcomes = time.perf_counter(), 0, {"loaded": 0, "refused": 0}
    while time.perf_counter() - started < BUDGET_S and cases < 2000:
        case = tmp_path / f"case-{cases}"
        raw = write_ml1m(case / "mirror")
        name = rng.choice(FILES)
        ops = [rng.choice(CORRUPTIONS) for _ in range(rng.randint(1, 2))]
        data = (raw / name).read_bytes()
        for op in ops:
            data = op(data, rng)
        (raw / name).write_bytes(data)
        out = case / "processed"
        result = runner.invoke(app, ["preprocess", "--raw", str(raw), "--out", str(out), "-q"])
        what = f"case {cases}: {name} <- {[op.__name__ for op in ops]}"
        if result.exit_code == 0:
            check_contract(out)
            outcomes["loaded"] += 1
        else:
            assert result.exit_code == 2, f"{what}: exit {result.exit_code}\n{result.output}\n{result.exc_info}"
            assert result.output.startswith("error: ") and "Traceback" not in result.output, what
            assert len(result.output.strip().splitlines()) == 1, f"{what}: {result.output}"
            assert not out.exists() and not list(case.glob(".processed*")), f"{what}: partial output"
            outcomes["refused"] += 1
        cases += 1
    assert cases >= 20 and outcomes["refused"] > 0, outcomes
