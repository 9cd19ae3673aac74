# ctscreen serve on the CPU: the screening service (web page, REST API, job store in /data).
#   docker build -t ctscreen:cpu .
#   docker run -p 8000:8000 -e CTSCREEN_TOKEN=... -v ./model.pth:/models/model.pth:ro \
#       -v ctscreen-data:/data ctscreen:cpu
# compose.yaml does the same (and has a `gpu` profile, which builds with CUDA wheels).
FROM python:3.11-slim-bookworm

# PyTorch's CPU-only wheels (about 200 MB instead of several GB with CUDA); the gpu
# profile of compose.yaml passes a CUDA index here instead.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# OpenVINO makes CPU scoring about 2.5x faster (README); the GPU image leaves it out.
ARG EXTRAS=serve

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/data/cache \
    MPLCONFIGDIR=/tmp/matplotlib

RUN pip install --index-url "${TORCH_INDEX}" "torch==2.14.1" "torchvision==0.29.1"

WORKDIR /opt/ctscreen
COPY pyproject.toml README.md ./
COPY src ./src
# DL3013 asks for pinned versions: this installs the project being built, whose
# dependencies pyproject.toml bounds (torch is pinned above).
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]" \
    && useradd --system --uid 10001 --create-home --home-dir /home/ctscreen ctscreen \
    && mkdir -p /data /models \
    && chown ctscreen:ctscreen /data

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

# Ready = model loaded, worker alive, store writable (the model takes a while to load).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

# Listening beyond loopback, the service refuses to start without CTSCREEN_TOKEN.
ENTRYPOINT ["ctscreen"]
CMD ["--log-level", "INFO", "serve", "--weights", "/models/model.pth", "--data", "/data", "--host", "0.0.0.0", "--port", "8000"]
