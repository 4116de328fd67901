# The serving image: SDXL on TorchServe 0.12 with CUDA, for k8s/.
# NOT BUILT OR RUN HERE: our build machines have no container runtime and no image registry
# (k8s/README.md says what was checked instead). Kept simple on purpose.
#
#   docker build -t sdxl-serve:0.1.0 .
#
# Versions are pinned: the CUDA base by tag, and by digest when CUDA_DIGEST is given (below),
# Python packages by requirements.lock with their hashes (pip --require-hashes; `make lock`
# writes it from requirements.txt), Java and tini by Ubuntu 24.04's packages. torch's Linux
# wheel brings its own CUDA user-space libraries; the base image only has to be no older
# than the driver-facing CUDA the wheel needs.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
# The base image's digest (sha256:...), which only a registry can tell: our build machines
# reach none, so it has no default here. Look it up where you build, then pass it:
#   docker buildx imagetools inspect nvidia/cuda:12.8.1-base-ubuntu24.04   (the Digest line)
#   docker build --build-arg CUDA_DIGEST=sha256:<that digest> -t sdxl-serve:0.1.0 .
# With it, the tag is only a label and the digest decides what is pulled.
ARG CUDA_DIGEST=

# --- build: the venv, the package, and the embedded tiny model's archive (for cpu-dev) ----
FROM ${CUDA_IMAGE}${CUDA_DIGEST:+@${CUDA_DIGEST}} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements.lock ./
# Every package and dependency pinned, and refused unless its file has a listed hash.
RUN pip install --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml setup.cfg ./
COPY handler handler
COPY jobs jobs
COPY config config
COPY scripts scripts
# Editable: the package stays at /app/handler, where the archive builder and config/ expect it.
RUN pip install --no-deps -e . \
 && python scripts/build_archive.py --name sdxl --version 1.0 --model-store /app/model_store \
 && rm -rf /app/build

# --- runtime ------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}${CUDA_DIGEST:+@${CUDA_DIGEST}}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/*
# Non-root, numeric so that runAsNonRoot can verify it.
RUN groupadd --gid 10001 sdxl \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin sdxl \
 && mkdir -p /run/sdxl && chown 10001:10001 /run/sdxl
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# The root file system is read-only in Kubernetes: everything written goes to /tmp and
# /run/sdxl (volumes there), bytecode included.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp TEMP=/tmp TMPDIR=/tmp SDXL_RUN_DIR=/run/sdxl HF_HUB_OFFLINE=1 \
    TS_METRICS_CONFIG=/app/config/metrics.yaml
# TS_METRICS_CONFIG: config.properties names metrics.yaml relative to the repo, but TorchServe
# runs in the run directory, where that path is missing and every worker dies at start
# reading it. Kubernetes sets its own (the ConfigMap's copy); this is for a plain run.
WORKDIR /app
USER 10001:10001
EXPOSE 8080 8082
# PID 1 is tini, an init: it passes SIGTERM on to its one child, `pod start`, which passes
# it on to its own, TorchServe's Java frontend (again each second until Java has ended: the
# JVM can drop one while it starts), whose shutdown hook stops it cleanly (listeners
# closed, models unregistered, workers ended); tini reaps the orphans a killed worker
# leaves behind (its engine process and fork server), which Java, reaping only its own
# children, would leave as zombies. In-flight work is drained before SIGTERM by the preStop hook
# (python -m sdxl_serve.pod drain). tests/e2e/test_pod.py runs this ENTRYPOINT.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "python", "-m", "sdxl_serve.pod", "start"]
# Without arguments: the embedded tiny model (k8s/overlays/cpu-dev passes the same).
CMD ["--model-store=/app/model_store", "--models", "sdxl=sdxl-1.0.mar"]
