"""Scheduled retraining: serve (or deploy) the ``retrain`` flow with the cron schedule in params.yaml.

    prefect server start --host 127.0.0.1 --port 4200          # the UI: http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/serve.py                                        # serves 'retrain/weekly-retrain'
    prefect deployment run 'retrain/weekly-retrain'              # or "Quick run" in the UI

With ``schedule.work_pool`` set (e.g. ``gpu-pool``), the deployment is registered on that work pool
instead, and a worker on the GPU machine runs it: ``prefect worker start --pool gpu-pool``.

One retrain at a time: the deployment has a concurrency limit of 1 (the UI shows it on the
deployment) with the ``CANCEL_NEW`` collision strategy, so a run started while another is running (a
manual run during the weekly one, late runs after an outage) is Cancelled by the server ("Deployment
concurrency limit reached.") instead of waiting for a slot (the default, ``ENQUEUE``, would run it
right after the first, re-downloading and retraining once more). A run killed without reporting
keeps its slot until the server's lease on it expires (300 s, renewed while the run lives). Runs
started outside the deployment meet the second layer, the project lock the flow itself takes (a
second run ends ``AlreadyRunning``, see flows/pipeline.py).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from flip.config import load_config  # noqa: E402
from pipeline import retrain  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]

# at most one run of the deployment at a time; a second one is cancelled, not queued
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def deployment(params: str | Path = PROJECT / "params.yaml", project: str | Path = PROJECT):
    """The ``retrain`` deployment with the schedule from ``params.yaml`` (not yet served or applied)."""
    cfg = load_config(params).schedule
    return retrain.to_deployment(
        name=cfg.name,
        schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
        parameters={"project": str(project), "pull_new_data": True},
        description="Weekly FLIP retraining on the newest data: download → … → report (DVC stages).",
        tags=["flip", "retrain"],
        work_pool_name=cfg.work_pool or None,
        concurrency_limit=ONE_AT_A_TIME,
    )


def main() -> None:  # pragma: no cover - long-running
    from flip.environment import apply

    apply()  # telemetry off and models offline (flip.environment) for the runs this process starts
    # Harmless prefect 3.8.8 shutdown warning: on SIGTERM (e.g. `docker stop`, a process manager)
    # Runner.handle_sigterm calls the sync/async-dispatching `stop()` inside the event loop, which
    # creates `astop()` without awaiting it, then exits; the runner still shuts down cleanly.
    warnings.filterwarnings(
        "ignore", message=r"coroutine 'Runner\.astop' was never awaited", category=RuntimeWarning)
    cfg = load_config(PROJECT / "params.yaml").schedule
    if cfg.work_pool:
        retrain.from_source(source=str(PROJECT), entrypoint="flows/pipeline.py:retrain").deploy(
            name=cfg.name, work_pool_name=cfg.work_pool, schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
            parameters={"project": str(PROJECT), "pull_new_data": True}, concurrency_limit=ONE_AT_A_TIME)
        print(f"deployed retrain/{cfg.name} to work pool {cfg.work_pool}; start a worker: "
              f"prefect worker start --pool {cfg.work_pool}")
    else:
        from prefect import serve

        serve(deployment(), pause_on_shutdown=False)


if __name__ == "__main__":  # pragma: no cover
    main()
