# The residual-adapters service. GPU image by default (official TensorFlow GPU base);
# a CPU image with:  docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0 -t ra-service:cpu .
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    RA_STORE_DIR=/data/store \
    RA_HOST=0.0.0.0 \
    RA_PORT=8000

WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY service ./service

# hadolint ignore=DL3013
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /data/store \
    && chown app /data/store

USER 10001
VOLUME ["/data/store"]
EXPOSE 8000
# the health check follows RA_PORT, so a container started on another port reports its real state
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('RA_PORT', '8000'), timeout=2).status != 200)"]
CMD ["python", "-m", "service"]
