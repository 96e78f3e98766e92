"""Progress in a log: one line per 10% (at most one per interval), nothing for a bar that ends at once."""

from __future__ import annotations

import io

from flip.progress import LineProgress


def test_ten_lines_and_a_last_one_with_true_totals(monkeypatch):
    monkeypatch.setattr(LineProgress, "min_interval", 0.0)
    out = io.StringIO()
    bar = LineProgress(1000, "epoch 1/3", "sample", stream=out)
    for _ in range(100):
        bar.update(10)
    bar.set_postfix(loss="0.5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 90%, then the closing 100% line
    assert lines[0].startswith("epoch 1/3:  10% 100/1.00k samples") and "ETA" in lines[0]
    assert lines[-1].startswith("epoch 1/3: 100% 1.00k/1.00k samples") and lines[-1].endswith("loss 0.5")


def test_a_fast_bar_writes_nothing():
    out = io.StringIO()
    bar = LineProgress(1000, "epoch 1/3", "sample", stream=out)
    for _ in range(100):
        bar.update(10)
    bar.close()
    assert out.getvalue() == ""


def test_resumed_bar_counts_from_where_it_was(monkeypatch):
    monkeypatch.setattr(LineProgress, "min_interval", 0.0)
    out = io.StringIO()
    bar = LineProgress(1000, "epoch 2/3", "sample", initial=500, stream=out)
    bar.update(100)
    assert out.getvalue().startswith("epoch 2/3:  60% 600/1.00k")
