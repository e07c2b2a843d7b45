# syntax=docker/dockerfile:1
# Two images from one file: `--target gateway` (small, no torch) and `--target worker` (CUDA torch).
# Sources are bind-mounted for the install only, so neither image keeps a copy of them.

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS gateway
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface \
    HF_HUB_OFFLINE=1
# The same UID in both images, and /artifacts owned by it, so a fresh shared volume is writable by both.
RUN useradd --create-home --uid 10001 app && install -d -o app -g app /artifacts
RUN --mount=type=bind,target=/src,rw pip install /src
USER app
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["confprobe", "gateway", "--host", "0.0.0.0", "--port", "8000"]

FROM ${CUDA_IMAGE} AS worker
# Must match the CUDA major.minor of CUDA_IMAGE.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    WORKER_DEVICE=cuda:0
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
RUN useradd --create-home --uid 10001 app && install -d -o app -g app /artifacts
# The CUDA build first, in its own layer: it is large and changes far less often than the project.
RUN pip install --index-url ${TORCH_INDEX_URL} torch==2.13.0
# The constraint keeps pip from swapping the CUDA torch above for PyPI's build.
RUN --mount=type=bind,target=/src,rw pip install --constraint /src/constraints.txt "/src[worker]"
USER app
WORKDIR /home/app
CMD ["confprobe", "worker"]
