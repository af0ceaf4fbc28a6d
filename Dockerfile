# The residual-adapters service. GPU image by default (official TensorFlow GPU base, TensorFlow reused);
# any Debian or Ubuntu base with python3 >= 3.10 and pip works too (pip then installs TensorFlow), e.g.
#   docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0 -t residual-adapters:cpu .
# Behind a TLS-intercepting proxy, hand pip the proxy's CA bundle for the install step only (never stored
# in the image):
#   DOCKER_BUILDKIT=1 docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt .
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PATH=/opt/venv/bin:$PATH \
    RA_STORE_DIR=/data/store \
    RA_HOST=0.0.0.0 \
    RA_PORT=8000 \
    RA_GRPC_PORT=8001 \
    RA_WORKERS=auto

WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY service ./service

# A virtual environment that sees the base's packages: the official images' TensorFlow is reused, and
# Debian's "externally managed" system Python is left alone. The base's own pip installs into it, so the
# base needs no ensurepip (python3-venv).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca_bundle,required=false \
    python3 -m venv --system-site-packages --without-pip /opt/venv \
    && if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python -m pip install --no-cache-dir . \
    && python -c "import tensorflow, service.boot, service.engine.core" \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /data/store \
    && chown app /data/store

USER 10001
VOLUME ["/data/store"]
EXPOSE 8000 8001
# RA_WORKERS=auto: on a GPU host (or 4+ cores) one engine process and a front end per core but one, else one
# process. On SIGTERM the supervisor stops the front ends (they stop accepting and let in-flight requests
# finish), then the engine. Front ends hand images to the engine through /dev/shm: run with --shm-size of a
# few hundred MB (the compose files do).
STOPSIGNAL SIGTERM
# the health check follows RA_PORT, so a container started on another port reports its real state
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('RA_PORT', '8000'), timeout=2).status != 200)"]
CMD ["python", "-m", "service"]
