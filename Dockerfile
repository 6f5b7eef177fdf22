# The `tuner` image: the CLI, the trial workloads and every extra (Ray, DeepSpeed, PostgreSQL,
# the dashboard, S3, tracking, QLoRA). One image serves every role in docker-compose.yml and
# deploy/kuberay/: sweep driver, dashboard, Ray head and GPU workers.
#   docker build -t tuner:latest .
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t tuner:latest .
# Versions are constraints.txt's, the ones the tests pass with: torch 2.13.0, and Ray 2.60.0 as
# the KubeRay manifests' rayVersion says. PyPI's Linux torch wheel is the CUDA build, its CUDA
# libraries come as wheels, and the host brings only the driver (NVIDIA Container Toolkit);
# TORCH_INDEX picks another build of the same version from PyTorch's index.
FROM python:3.11-slim

ARG TORCH_INDEX=
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

# A compiler for DeepSpeed's ops (built from its source package, and JIT-compiled at first use).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY constraints.txt ./
# torch first, in its own layer: DeepSpeed builds against the torch already installed, and a
# change to tuner's code does not download torch again.
RUN pip install -c constraints.txt ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch
COPY pyproject.toml README.md ./
COPY tuner ./tuner
COPY trials ./trials
COPY search_spaces ./search_spaces
RUN pip install -c constraints.txt '.[all]'

COPY deploy/docker/entrypoint.sh /usr/local/bin/tuner-entrypoint
RUN useradd --create-home --uid 1000 tuner && mkdir -p /cache /work && chown tuner /cache /work
USER tuner
WORKDIR /work
ENTRYPOINT ["tuner-entrypoint"]
CMD ["tuner", "--help"]
