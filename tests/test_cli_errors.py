"""What the CLI turns into one paragraph: a full disk is not bad input (exit 75, retried by the flow)."""

from __future__ import annotations

import os

import pytest
import typer

from flip.cli import _stage, disk_full


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_full_disk_is_one_paragraph_and_exit_75(capsys):
    @_stage
    def write() -> None:  # /dev/full: every write fails with ENOSPC, as on a full disk
        with open("/dev/full", "w") as fh:
            fh.write("x" * 100)

    with pytest.raises(typer.Exit) as exit_:
        write()
    assert exit_.value.exit_code == 75
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device") and err.count("\n") == 1 and "Fix:" in err, err


def test_other_errors_are_not_taken_for_a_full_disk():
    assert not disk_full(ValueError("bad"))
    wrapped = RuntimeError("IO Error: could not write")
    wrapped.__cause__ = OSError(28, "No space left on device")
    assert disk_full(wrapped) and disk_full(RuntimeError('Could not write file "x.wal": No space left on device'))

    @_stage
    def broken() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # a bug stays a traceback for the developer, not a disk message
        broken()


@pytest.mark.parametrize("override, key", [("finetune.plm_seeds=0", "finetune.plm_seeds"),
                                           ("finetune.plm_epochs=0", "finetune.plm_epochs"),
                                           ("finetune.plm_batch_size=0", "finetune.plm_batch_size"),
                                           ("pretrain.plm_lr=0", "pretrain.plm_lr")])
def test_a_zero_that_used_to_mean_another_key_is_refused_with_the_fix(tmp_path, override, key):
    from typer.testing import CliRunner

    from flip.cli import app
    from helpers import assert_one_paragraph_failure

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["finetune", "-S", override, "--data", str(tmp_path), "--out", str(out)])
    assert_one_paragraph_failure(result, out, key, "no longer means", "Fix:")
