# nanoparallel in a container, CPU or CUDA.
#   docker build --target cpu  -t nanoparallel:cpu  .  &&  docker run --rm nanoparallel:cpu make test
#   docker build --target cuda -t nanoparallel:cuda .  &&  docker run --rm --gpus all --ipc=host nanoparallel:cuda make train
# Both install requirements.txt into /nanoparallel/.venv with the Makefile's own `make venv`, so `make train`
# and `make test` find it ready. torch 2.13.0 from PyPI is the CUDA build (it brings its own CUDA libraries:
# the host needs only the NVIDIA driver and the container toolkit); the cpu target takes the CPU wheel instead.

FROM python:3.11-slim AS base
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /nanoparallel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

FROM base AS cpu
COPY requirements.txt Makefile ./
RUN python -m venv .venv \
 && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && make venv
COPY . .

FROM base AS cuda
COPY requirements.txt Makefile ./
RUN make venv
COPY . .
