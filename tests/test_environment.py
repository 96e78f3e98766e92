"""The tools' environment (flip/environment.py) and the image that must match it (Dockerfile, .dockerignore)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import ROOT

from flip.environment import OPT_OUTS, tool_env


def test_tool_env_adds_the_opt_outs_and_keeps_what_the_user_set():
    env = tool_env({"HF_HUB_OFFLINE": "0", "PATH": "/bin"}, EXTRA="x")
    assert env["HF_HUB_OFFLINE"] == "0"  # the user's explicit choice wins
    assert env["DVC_NO_ANALYTICS"] == "1" and env["DO_NOT_TRACK"] == "1" and env["EXTRA"] == "x"
    assert {k: env[k] for k in OPT_OUTS if k != "HF_HUB_OFFLINE"} == {k: v for k, v in OPT_OUTS.items()
                                                                      if k != "HF_HUB_OFFLINE"}


def test_the_cli_sets_the_opt_outs_before_a_command_runs(tmp_path):
    # the CLI in a process whose environment lacks every opt-out; a command runs (and fails: no report inputs)
    code = ("import os, sys\n"
            "for k in list(os.environ):\n"
            f"    if k in {sorted(OPT_OUTS)!r}: del os.environ[k]\n"
            "from typer.testing import CliRunner\n"
            "from flip.cli import app\n"
            "r = CliRunner().invoke(app, ['report', '--out', sys.argv[1]])\n"
            f"print(all(k in os.environ for k in {sorted(OPT_OUTS)!r}))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k not in OPT_OUTS})
    assert done.stdout.strip().splitlines()[-1] == "True", done.stdout + done.stderr


def test_the_image_installs_the_lock_and_sets_the_same_environment():
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()  # continuations joined
    runs = " ".join(line[4:] for line in lines if line.startswith("RUN "))
    assert "-r requirements.lock" in runs and "--no-deps" in runs
    # every pip/uv install of the project or a package is pinned or --no-deps: never a resolving install
    for cmd in re.findall(r"(?:pip|uv pip) install[^&]*", runs):
        assert "--no-deps" in cmd or re.search(r"==\S+", cmd), cmd
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(line[4:] for line in lines if line.startswith("ENV "))))
    for key, value in OPT_OUTS.items():
        assert env.get(key) == value, f"Dockerfile ENV {key}={env.get(key)}, flip/environment.py says {value}"
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".dvc/cache", ".dvc/config.local", "data", "models", "reports"} <= ignored
