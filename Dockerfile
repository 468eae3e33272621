# syntax=docker/dockerfile:1
# The voice agent with a CUDA build of torch: `docker compose up` (see docker-compose.yml) or
#   docker build -t qwen-voice-agent . && docker run --gpus all -p 8080:8080 -v hf-cache:/cache qwen-voice-agent
#
# Base: python:3.11-slim-bookworm rather than nvidia/cuda. The torch wheels bring their own CUDA
# user-space libraries (the nvidia-* wheels: cuBLAS, cuDNN, NCCL, ...); the only thing a container
# needs from the host is the driver, which the NVIDIA Container Toolkit mounts in. An nvidia/cuda
# base would add a second copy of those libraries (GBs) and a system Python of another version.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# torch from PyPI is the CUDA build on Linux x86_64 (2.13.0: CUDA 13.0, which needs a host driver
# >= 580). For an older driver, take a CUDA 12.x variant from PyTorch's own index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The version is the one the Makefile pins.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG EXTRAS=server,mqtt,homeassistant,webhook,livekit,wyoming

# HF_HOME / VOICE_AGENT_CACHE: model weights and the built tiny-random model live on the /cache
# volume, so a restarted or rebuilt container does not download 17 GB again. Set
# HF_HUB_OFFLINE=1 at run time once the cache is filled.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    VOICE_AGENT_CACHE=/cache/voice-agent \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# No system packages are installed: av bundles FFmpeg, aiortc bundles libopus/libvpx, pylibsrtp
# bundles libsrtp, livekit bundles its FFI library, torch bundles libgomp. What their shared
# objects still link (glibc, libstdc++, libgcc, zlib; checked with ldd) is in the slim image, and
# every dependency installs as a binary wheel, so no compiler is needed either.
RUN groupadd --system --gid 10001 agent \
 && useradd --system --uid 10001 --gid agent --home-dir /home/agent --create-home \
      --shell /usr/sbin/nologin agent \
 && mkdir -p /cache/huggingface /cache/voice-agent /etc/voice-agent \
 && chown -R agent:agent /cache

# torch first, in its own layer (several GB, changes rarely); the project's `torch>=2.4` is then
# already satisfied and pip does not replace it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY plugins ./plugins
COPY examples ./examples
RUN pip install ".[${EXTRAS}]" \
 && voice-agent schema > /dev/null \
 && python -c "import torch, av, aiortc, aiomqtt, livekit.rtc, agent.server.app"
# A default configuration; docker-compose.yml mounts deploy/agent.yaml over it.
COPY deploy/agent.yaml /etc/voice-agent/config.yaml

USER agent
VOLUME ["/cache"]
EXPOSE 8080 10300

# /healthz (= /readyz) answers without the bearer token: 200 while an answer can be produced, 503
# with the reason while not (model server or every inference worker down or loading). Docker has
# one check, so it is the readiness one; /livez (200 while the process serves) is for an
# orchestrator's liveness probe. The start period covers a first download of the weights.
# The image has no curl: Python does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["voice-agent"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--config", "/etc/voice-agent/config.yaml"]
