"""The retrain flow's training task on a Prefect *process* work pool, as the README's GPU recipe runs it:
``prefect work-pool create P --type process``, a deployment from source on the pool, ``prefect worker
start --pool P``. A real Prefect server (the session's test server), a real worker subprocess, and a
flow run that trains the ``scratch`` stage (``run_stage``, the task every training stage of the
retrain flow runs) of a DVC repository on synthetic data in a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

POOL = "test-process-pool"
WORKER_WAIT_S = 240

# the deployment: the retrain flow's training task, wrapped in a flow that also says where it ran
PROBE = '''
import json, os, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefect import flow
from pipeline import run_stage


@flow(name="train-on-pool")
def train_on_pool(project: str, stage: str = "scratch") -> list[str]:
    outputs = run_stage(project, stage)
    Path(project, "ran-in.json").write_text(json.dumps({"pid": os.getpid(), "outputs": outputs}))
    return outputs
'''


def _fast_scratch(params: dict) -> None:
    params["finetune"].update({"epochs": 1, "lr_grid": [], "eval_batch_size": 1024})
    params["id_model"].update({"embedding_dim": 8, "dnn_hidden_units": [16], "low_rank": 4, "num_experts": 2})
    params["run"].update({"seeds": [1], "device": "cpu", "threads": 1, "progress": False})


def test_a_process_worker_runs_the_training_task(prefect_server, dvc_repo, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    project = Path.cwd()  # dvc_repo: a git + DVC copy of the project on 3,000 synthetic rows
    params = yaml.safe_load((project / "params.yaml").read_text())
    _fast_scratch(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_repo("dvc", "repro", "preprocess")  # the training stage's input; the worker trains
    (project / "flows" / "train_on_pool.py").write_text(PROBE)

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1",
           "FLIP_STAGE_RETRY_DELAY": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    created = subprocess.run([str(bin_dir / "prefect"), "work-pool", "create", POOL, "--type", "process",
                              "--overwrite"], env=env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr

    sys.path.insert(0, str(project / "flows"))
    try:
        from prefect import flow

        deployment_id = flow.from_source(source=str(project), entrypoint="flows/train_on_pool.py:train_on_pool").deploy(
            name="scratch", work_pool_name=POOL, parameters={"project": str(project)}, print_next_steps=False)
    finally:
        sys.path.remove(str(project / "flows"))
    run = run_deployment("train-on-pool/scratch", timeout=0)  # scheduled now; nobody runs it yet
    assert run.deployment_id == deployment_id

    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        worker = subprocess.Popen([str(bin_dir / "prefect"), "worker", "start", "--pool", POOL, "--run-once"],
                                  cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            worker.wait(timeout=WORKER_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
            worker.wait()
    tail = "\n--- worker log ---\n" + log.read_text(errors="replace")[-6000:]

    import anyio

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(run.id)

    state = anyio.run(read).state
    assert state is not None and state.is_completed(), f"{state}{tail}"
    assert worker.returncode == 0, tail

    ran = json.loads((project / "ran-in.json").read_text())
    assert ran["pid"] not in (os.getpid(), worker.pid)  # the worker started a process for the run
    assert ran["outputs"] == ["models/finetune/scratch"]
    metrics = json.loads((project / "models/finetune/scratch/metrics.json").read_text())
    assert 0.0 < metrics["test"]["auc"] <= 1.0
    assert "Running stage" not in dvc_repo("dvc", "repro", "scratch")  # recorded in dvc.lock: up to date
