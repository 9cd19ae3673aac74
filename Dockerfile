# ctscreen in a container: the screening service (web page, REST API, job store in /data)
# and the DICOM node (C-ECHO, CT C-STORE in; SR and key images out), started together.
#
#   docker build -t ctscreen .                       # runtime (default): CPU, no PyTorch
#   docker build --target full -t ctscreen:full .    # + PyTorch (CPU), training, quantize
#   docker build --target full --build-arg CTSCREEN_TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#       -t ctscreen:gpu .                            # + PyTorch with CUDA
#
# The runtime image scores a bundle made once by `ctscreen export model.pth -o bundle`
# (in the full image or any install with PyTorch), mounted at /models/model:
#   docker run -p 8000:8000 -p 11112:11112 -e CTSCREEN_TOKEN=... \
#       -v ./bundle:/models/model:ro -v ctscreen-data:/data ctscreen
# Settings come from CTSCREEN_* variables (README, "Containers"); compose.yaml sets them.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/data/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    CTSCREEN_WEIGHTS=/models/model \
    CTSCREEN_DATA=/data \
    CTSCREEN_HOST=0.0.0.0 \
    CTSCREEN_PORT=8000 \
    CTSCREEN_DICOM_PORT=11112 \
    CTSCREEN_AE_TITLE=CTSCREEN
# One user and group, 10001:10001, owning /data; a virtual environment works the same on
# the official Python image and on a plain Debian base with python3-venv.
RUN python3 -m venv /opt/venv \
    && groupadd --gid 10001 ctscreen \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/ctscreen \
        --shell /usr/sbin/nologin ctscreen \
    && mkdir -p /data /models \
    && chown 10001:10001 /data
WORKDIR /opt/ctscreen
COPY pyproject.toml README.md ./
COPY src ./src
VOLUME ["/data"]
EXPOSE 8000 11112
# Ready = model loaded, worker alive, store writable. Over HTTPS when CTSCREEN_TLS_CERT is
# set (its own address: the certificate's name is not checked).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = bool(os.environ.get('CTSCREEN_TLS_CERT')); c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; urllib.request.urlopen('%s://127.0.0.1:%s/readyz' % ('https' if tls else 'http', os.environ.get('CTSCREEN_PORT', '8000')), timeout=4, context=c if tls else None)"]
# The weights, the DICOM node and the addresses come from the CTSCREEN_* variables above.
# A missing weight file, extra or bad setting ends it at once with one sentence, code 2.
ENTRYPOINT ["ctscreen"]
CMD ["--log-level", "INFO", "serve"]

# PyTorch (CPU wheels by default; a CUDA index for the GPU image), training, quantize.
# The index is a build argument so that a site behind a PyPI mirror can name its own.
FROM base AS full
ARG CTSCREEN_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
# pip reads an optional CA bundle for a site's TLS proxy from the secret pip_cert.
# DL3013: this installs the project being built, whose dependencies pyproject.toml bounds.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install --index-url "${CTSCREEN_TORCH_INDEX}" "torch==2.14.1" "torchvision==0.29.1" \
    && pip install ".[torch,serve,dicom,quantize]" \
    && chown -R 10001:10001 /home/ctscreen
USER 10001:10001

# The default: CPU scoring with the OpenVINO runtime, no PyTorch, the service and the
# DICOM node (the serve and dicom extras).
FROM base AS runtime
ARG PIP_INDEX_URL=https://pypi.org/simple
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install ".[serve,dicom]" \
    && if pip list 2>/dev/null | grep -iE '^(torch|torchvision|nvidia-)'; then \
        echo "the runtime image must not hold PyTorch or CUDA libraries" >&2; exit 1; fi
USER 10001:10001
