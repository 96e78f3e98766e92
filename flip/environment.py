"""The environment every tool the project starts runs in: telemetry off, the language model offline.

DVC, Prefect, Great Expectations and Evidently each phone home unless told not to, and Hugging Face
downloads models unless told not to. The opt-outs live here, in the code that starts the tools (the
CLI before a stage imports one, the flows before they start Prefect or run a stage), not only in the
Makefile or the image, so that ``flip <stage>`` and ``python flows/serve.py`` behave the same however
they are launched. A value the user set explicitly is kept (``HF_HUB_OFFLINE=0`` to allow hub
downloads of a ``plm.name`` hub id).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

OPT_OUTS: dict[str, str] = {
    "DVC_NO_ANALYTICS": "1",  # DVC
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # Prefect's server
    "GX_ANALYTICS_ENABLED": "False",  # Great Expectations
    "DO_NOT_TRACK": "1",  # Evidently (iterative-telemetry) and others that honour it
    "HF_HUB_OFFLINE": "1",  # transformers: local files only (the default model ships as a package)
    "TOKENIZERS_PARALLELISM": "false",  # no fork warning from the tokenizers' thread pool
}


def tool_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child process: ``base`` (default ``os.environ``) with the opt-outs
    where ``base`` does not set them, then ``extra``."""
    env = dict(os.environ if base is None else base)
    for key, value in OPT_OUTS.items():
        env.setdefault(key, value)
    env.update(extra)
    return env


def apply() -> None:
    """Set the opt-outs in this process's environment (where not set already): called by the CLI
    and the flows' entry points, never at import."""
    for key, value in OPT_OUTS.items():
        os.environ.setdefault(key, value)


def executable(name: str) -> str:
    """A console script of this environment (``dvc``, ``flip``, ``gto``): the one beside this Python
    first, as a worker's PATH may not include the virtual environment, else PATH's."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def dvc_executable() -> str:
    """The dvc executable of this environment."""
    return executable("dvc")
