# syntax=docker/dockerfile:1
# One image for both roles; the command picks it:
#   docker run ... rvr-serve:0.1.0 serve  --redis-url redis://redis:6379/0   # API
#   docker run ... rvr-serve:0.1.0 worker --redis-url redis://redis:6379/0   # GPU worker
#   docker run ... rvr-serve:0.1.0 serve                                      # in-process: API + worker
#
# Base: nvidia/cuda "base" (Ubuntu 24.04, Python 3.12). It brings only the CUDA runtime stub and the
# NVIDIA container-runtime variables; the CUDA libraries come with the torch wheel (cu130 here), so
# the image does not carry two copies. CUDA 13 supports sm_90 (H100) and needs driver >= 580; for an
# older driver build with BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 and
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (if that torch release still ships cu128).
#
# CPU variant (API-only pods, CI): --build-arg TORCH_VARIANT=cpu installs torch==2.13.0 (CPU build) and
# leaves out the compiler that Triton needs at run time. BASE_IMAGE=ubuntu:24.04 makes it smaller still.
#
# The model is never downloaded: mount a checkpoint directory at /models/rvr (RVR_MODEL).

ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip extras of the rvr-serve package (pyproject.toml); empty: none.
ARG PIP_EXTRAS=triton

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Distribution packages follow the pinned base image; torch and the package pin what matters.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is most of the image and changes least.
RUN case "$TORCH_VARIANT" in \
      cpu)  idx="$TORCH_CPU_INDEX_URL" ;; \
      cuda) idx="$TORCH_INDEX_URL" ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu" >&2; exit 2 ;; \
    esac \
 && pip install "torch==${TORCH_VERSION}" --index-url "$idx"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY kernels ./kernels
COPY server ./server
# A regular (not editable) install: the image runs from site-packages, not from /src.
# hadolint ignore=DL3013
RUN if [ -n "$PIP_EXTRAS" ]; then spec=".[${PIP_EXTRAS}]"; else spec="."; fi \
 && pip install "$spec" \
 && python -c "import server.cli, engine, torch; print('torch', torch.__version__)"

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_VARIANT=cuda
LABEL org.opencontainers.image.title="rvr-serve" \
      org.opencontainers.image.description="RvR refinement service: rvr serve (API) / rvr worker (GPU)" \
      org.opencontainers.image.licenses="MIT"

ENV DEBIAN_FRONTEND=noninteractive
# tini: PID 1 that forwards SIGTERM (drain) and reaps compiler subprocesses.
# gcc + python3-dev: Triton compiles its small C launcher at run time (CUDA variant only).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini ca-certificates \
 && if [ "$TORCH_VARIANT" = cuda ]; then \
      apt-get install -y --no-install-recommends gcc libc6-dev python3-dev; \
    fi \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 rvr \
 && useradd --system --uid 10001 --gid rvr --home-dir /home/rvr --create-home --shell /usr/sbin/nologin rvr \
 && mkdir -p /models/rvr && chown rvr:rvr /models/rvr

COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/rvr-healthcheck

# Container defaults only; everything else is a setting (`rvr settings`) passed by the deployment.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRITON_HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/triton \
    RVR_HOST=0.0.0.0 \
    RVR_PORT=8000 \
    RVR_WORKER_PORT=9100 \
    RVR_MODEL=/models/rvr

USER 10001:10001
WORKDIR /home/rvr
EXPOSE 8000 9100

# Liveness only (no dependencies): the API's /livez on RVR_PORT, else the worker's on RVR_WORKER_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/usr/local/bin/rvr-healthcheck", "/livez"]

ENTRYPOINT ["/usr/bin/tini", "--", "rvr"]
CMD ["serve"]
