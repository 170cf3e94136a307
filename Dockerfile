# syntax=docker/dockerfile:1
# The inferline services image: router, features, postprocess and degradation
# (`inferline serve <service>`), `inferline gateway render`, batch and stream commands.
# Triton runs from NVIDIA's NGC image on the same model repository (deploy/k8s, docs/deploy.md).
#
#   docker build -t inferline:0.1.0 .
#   docker run --rm -p 50051:50051 -v $PWD/my.yaml:/etc/inferline/inferline.yaml:ro \
#     inferline:0.1.0 serve router --triton-url triton:8001
#
# Two stages: the builder resolves and installs the pinned dependencies (pyproject.toml)
# into a virtual environment; the runtime stage copies only that environment, so it has no
# compiler, no pip cache and nothing to fetch when a container starts. Base images are
# pinned by version; pin them by digest too (@sha256:...) where you mirror them.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/inferline
WORKDIR /src
# Dependencies first (cached while only the code changes): the project's own pins.
COPY pyproject.toml README.md ./
COPY services/inferline/__init__.py services/inferline/__init__.py
RUN /opt/inferline/bin/pip install . && /opt/inferline/bin/pip uninstall -y inferline
COPY services ./services
# services/inferline/triton/onnx_runner.py links here (the Triton python-backend runner).
COPY triton_models/onnx_runner.py ./triton_models/onnx_runner.py
RUN /opt/inferline/bin/pip install --no-deps . \
    && /opt/inferline/bin/inferline --help > /dev/null

FROM ${PYTHON_IMAGE}
# Caches under /tmp: the pods run with a read-only root filesystem and /tmp as a volume.
ENV PATH=/opt/inferline/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    INFERLINE_LOG_LEVEL=INFO
# A fixed, unprivileged user: Kubernetes' runAsNonRoot checks the numeric id.
RUN groupadd --system --gid 10001 inferline \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin inferline
COPY --from=builder /opt/inferline /opt/inferline
WORKDIR /app
# The Feast feature repository definitions the features service reads (its online store
# is configured in feature_store.yaml: Redis in a cluster).
COPY --chown=10001:10001 deploy/feast/feature_repo/*.py deploy/feast/feature_repo/feature_store.yaml deploy/feast/feature_repo/
COPY deploy/local/inferline.yaml /etc/inferline/inferline.yaml
USER 10001:10001
# Router gRPC (the suite's public port behind Envoy) and Prometheus metrics.
EXPOSE 50051 9464
ENTRYPOINT ["inferline"]
CMD ["serve", "router", "--config", "/etc/inferline/inferline.yaml"]
