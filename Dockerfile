# The `tuner` image: the CLI, the trial workloads and Ray, on a CUDA PyTorch base. One image
# serves every role in docker-compose.yml and deploy/kuberay/: sweep driver, dashboard, Ray head
# and GPU workers.
#   docker build -t tuner:latest .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY tuner ./tuner
COPY trials ./trials
COPY search_spaces ./search_spaces
# The base image's CUDA torch satisfies `torch>=2.4`: pip keeps it. boto3 for s3:// artifacts,
# bitsandbytes for QLoRA (`quantization_bit`).
RUN pip install '.[s3,qlora]'

COPY deploy/docker/entrypoint.sh /usr/local/bin/tuner-entrypoint
RUN useradd --create-home --uid 1000 tuner && mkdir -p /cache /work && chown tuner /cache /work
USER tuner
WORKDIR /work
ENTRYPOINT ["tuner-entrypoint"]
CMD ["tuner", "--help"]
