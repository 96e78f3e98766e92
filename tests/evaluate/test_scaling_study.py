"""The pretraining-scaling study's bookkeeping: points from different calls keep their own provenance."""

from benchmarks.pretrain_scaling import provenance, reading


def _point(rows: int, delta: float, p: float, **extra) -> dict:
    return {"rows": rows, "delta": delta, "ci_low": delta - 0.001, "ci_high": delta + 0.001, "p_value": p, **extra}


def test_an_old_point_takes_the_provenance_of_the_call_that_wrote_the_file():
    previous = {"machine": {"cpu": "Intel(R) Xeon(R) Processor"}, "date": "2026-12-04 22:55 UTC", "idle": True,
                "scratch": {"test_auc": 0.8569}, "precision": {"pretrain": "bf16"}}
    old = provenance(previous, _point(64000, 0.0032, 1e-7))
    assert old["machine"] == "Intel(R) Xeon(R) Processor" and old["date"] == "2026-12-04 22:55 UTC"
    assert old["scratch"] == {"test_auc": 0.8569} and old["idle"] is True
    new = _point(128000, 0.004, 1e-8, machine="AMD EPYC", date="2026-12-08 01:00 UTC")
    assert provenance(previous, new) == new  # a point with its own provenance keeps it


def test_the_reading_names_every_machine_only_when_there_are_several():
    one = [_point(2000, -0.0005, 0.08, machine="A"), _point(64000, 0.0032, 1e-7, machine="A")]
    assert "machines" not in reading(one)
    assert "interval excludes zero from 64,000 rows on" in reading(one)
    two = [*one, _point(128000, 0.0020, 0.01, machine="B")]
    text = reading(two)
    assert "2 machines (A, B" in text and "not monotonically" in text
