"""Atomic writes: all or nothing, with the permissions the user's umask gives a plain write; an output
folder is replaced only when flip wrote it; a kill during a folder swap is recovered by the next write."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from flip.io import CRASH_ENV, MARKER, OutputInUse, atomic_dir, atomic_file, recover_dir, write_json


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                       (0o077, 0o600, 0o700)])
def test_outputs_respect_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == dir_mode


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "outdir") as d:
            (d / "x").write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ an output folder flip did not write
def test_a_folder_with_other_files_is_refused_and_kept(tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "plots").mkdir()
    with pytest.raises(OutputInUse) as err:
        with atomic_dir(out, "drift", ("drift.json",)):
            raise AssertionError("the body must not run")
    text = str(err.value)
    assert "choose an empty or new folder" in text and "flip drift did not write: metrics.json, plots" in text
    assert "\n" not in text and sorted(p.name for p in out.iterdir()) == ["metrics.json", "plots"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # no temporary left


def test_rewriting_its_own_output_works(tmp_path):
    out = tmp_path / "drift"
    for n in (1, 2):
        with atomic_dir(out, "drift") as d:
            (d / "drift.json").write_text(str(n))
    assert (out / "drift.json").read_text() == "2"
    assert json.loads((out / MARKER).read_text()) == {"stage": "drift"}
    assert (out / MARKER).read_bytes() == b'{"stage": "drift"}\n'  # deterministic: DVC hashes stay stable
    with pytest.raises(OutputInUse, match="holds the output of flip drift"):  # another stage's output
        with atomic_dir(out, "package"):
            pass
    assert (out / "drift.json").read_text() == "2"


def test_an_older_unmarked_output_of_the_known_layout_is_replaced(tmp_path):
    out = tmp_path / "processed"
    out.mkdir()
    for name in ("meta.json", "train.parquet", "vocab.parquet"):
        (out / name).write_text("old")
    with atomic_dir(out, "preprocess", ("meta.json", "*.parquet")) as d:
        (d / "meta.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "meta.json"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine too
    with atomic_dir(tmp_path / "empty", "preprocess") as d:
        (d / "x").write_text("x")
    assert (tmp_path / "empty" / "x").exists()


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(OutputInUse, match="is a file"):
        with atomic_dir(tmp_path / "out", "drift"):
            pass
    assert (tmp_path / "out").read_text() == "keep me"


# ------------------------------------------------------------------------------ crash recovery
CRASH_WRITE = """
import sys
import flip.io
if sys.argv[3] == "renames":  # the two-rename swap of file systems without renameat2(RENAME_EXCHANGE)
    flip.io._renameat2 = lambda: None
with flip.io.atomic_dir(sys.argv[1], "test") as d:
    (d / "value.txt").write_text(sys.argv[2])
"""


def _write(out, value: str, swap: str, crash: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash:
        env[CRASH_ENV] = crash
    return subprocess.run([sys.executable, "-c", CRASH_WRITE, str(out), value, swap], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("swap, point, after_crash", [
    ("renames", "atomic_dir:between-renames", "new"),  # the output is missing: the swap is finished
    ("renames", "atomic_dir:before-swap", "old"),
    ("renames", "atomic_dir:after-swap", "new"),
    ("exchange", "atomic_dir:before-swap", "old"),
    ("exchange", "atomic_dir:after-swap", "new"),
])
def test_a_kill_during_the_swap_is_recovered(tmp_path, swap, point, after_crash):
    out = tmp_path / "out"
    assert _write(out, "old", swap).returncode == 0
    done = _write(out, "new", swap, crash=point)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    assert left, "the crash left nothing to recover"
    if point == "atomic_dir:between-renames":
        assert not out.exists() and any(".out.old-" in n for n in left)
    assert recover_dir(out)
    assert (out / "value.txt").read_text() == after_crash
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # and a rerun after a crash recovers by itself, then writes
    assert _write(out, "newer", swap, crash=point).returncode == -signal.SIGKILL
    assert _write(out, "newest", swap).returncode == 0
    assert (out / "value.txt").read_text() == "newest" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_recovery_leaves_the_writes_of_live_processes_alone(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "test") as d:
        (d / "value.txt").write_text("1")
    with atomic_dir(out, "test") as d:  # a write in progress in this process
        assert recover_dir(out) == "" and d.exists()
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            other = tmp_path / f".out.{live.pid}.abcd1234.tmp"  # another live process's temporary
            other.mkdir()
            assert recover_dir(out) == "" and other.exists()
        finally:
            live.kill()
            live.wait()
        assert recover_dir(out) == "removed leftovers" and not other.exists() and d.exists()
        (d / "value.txt").write_text("2")
    assert (out / "value.txt").read_text() == "2"


# ---------------------------------------------------------------------- the stages' --out, end to end
def _flip(*args: str):
    from typer.testing import CliRunner

    from flip.cli import app

    return CliRunner().invoke(app, list(args))


def _refused(result, folder, stage: str, foreign: str) -> None:
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    text = result.stderr.strip()
    assert "\n" not in text and "Traceback" not in text, text
    assert f"{folder} holds files that flip {stage} did not write: {foreign}" in text, text
    assert "choose an empty or new folder" in text


SYNTHETIC = ("-S", "data.dataset=synthetic", "-S", "data.synthetic.rows=400")


@pytest.mark.slow
def test_preprocess_into_a_folder_holding_raw_data_refuses_and_into_its_own_output_reruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "ratings.dat").write_text("1::2::5::978300760\n")
    _refused(_flip("preprocess", *SYNTHETIC, "--raw", "raw", "--out", "data", "-q"), "data", "preprocess", "raw")
    assert (tmp_path / "data" / "raw" / "ratings.dat").read_text() == "1::2::5::978300760\n"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]

    out = tmp_path / "processed"
    assert _flip("preprocess", *SYNTHETIC, "--raw", "raw", "--out", str(out), "-q").exit_code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert MARKER in first and "meta.json" in first
    assert _flip("preprocess", *SYNTHETIC, "--raw", "raw", "--out", str(out), "-q").exit_code == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # byte-identical, marker included
    (out / MARKER).unlink()  # a processed dataset written before the marker: its known files only
    assert _flip("preprocess", *SYNTHETIC, "--raw", "raw", "--out", str(out), "-q").exit_code == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    (out / MARKER).unlink()
    (out / "notes.txt").write_text("mine")  # ... and nothing else (a marked folder is the stage's own)
    _refused(_flip("preprocess", *SYNTHETIC, "--raw", "raw", "--out", str(out), "-q"), out, "preprocess", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_drift_into_the_reports_folder_refuses_and_keeps_its_files(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = synthetic_data(400)
    (tmp_path / "reports" / "plots").mkdir(parents=True)
    (tmp_path / "reports" / "metrics.json").write_text('{"auc": 0.8}')
    _refused(_flip("drift", "--data", str(data), "--out", "reports"), "reports", "drift", "metrics.json, plots")
    assert (tmp_path / "reports" / "metrics.json").read_text() == '{"auc": 0.8}'
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["metrics.json", "plots"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]


@pytest.mark.slow
def test_drift_reruns_into_its_own_output(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = synthetic_data(400)
    for _ in range(2):
        result = _flip("drift", "--data", str(data), "--out", "reports/drift")
        assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "reports" / "drift").iterdir()} == {
        MARKER, "drift.json", "window_drift.html", "window_drift.json"}
