"""Atomic writes: all or nothing, with the permissions the user's umask gives a plain write."""

from __future__ import annotations

import os
import stat

import pytest

from flip.io import atomic_dir, atomic_file, write_json


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
