# syntax=docker/dockerfile:1
# webhook-bridge: MQTT to webhook bridge with a durable SQLite queue.
#
#   docker build -t webhook-bridge .
#   docker run -d --name webhook-bridge \
#     -v "$PWD/config.yaml:/etc/webhook-bridge/config.yaml:ro" \
#     -v webhook-bridge-state:/var/lib/webhook-bridge \
#     -v webhook-bridge-conf-d:/etc/webhook-bridge/conf.d \
#     -p 127.0.0.1:9883:9883 webhook-bridge
#
# In a container set `admin.listen: 0.0.0.0:9883`, or /metrics and the API cannot be
# reached from outside it; the HEALTHCHECK uses 127.0.0.1 and works with either (it needs
# the admin server on port 9883: with `admin.listen: null` disable it with --no-healthcheck).
# docs/docker-compose.yml runs it next to Mosquitto.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels for the project and every dependency --------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A compiler and headers, for dependencies that publish no wheel for the target
# architecture (linux/arm/v7: PyYAML; with the broker extra also psutil, cffi,
# argon2-cffi-bindings); they stay in this stage. cbor2 is kept below 6 there by an
# environment marker in setup.cfg (cbor2 6 is Rust-only).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libffi-dev \
    && rm -rf /var/lib/apt/lists/*
# EXTRAS=broker adds the embedded MQTT broker (mqtt.embedded: true); the default image is
# the small gateway install that connects to a broker such as Mosquitto.
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY bridge ./bridge
RUN pip wheel --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

# --- runtime: the wheels only, no build tools, not root -------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STATE_DIRECTORY=/var/lib/webhook-bridge \
    WEBHOOK_BRIDGE_CONFIG=/etc/webhook-bridge/config.yaml
# The wheels are bind-mounted from the builder, so they never land in a layer.
ARG EXTRAS=""
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels \
        "mqtt-webhook-bridge${EXTRAS:+[$EXTRAS]}" \
    && webhook-bridge --version
# conf.d is where the admin API writes webhooks; it belongs to the service user (a named
# volume mounted there inherits this owner).
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --no-create-home \
        --home-dir /var/lib/webhook-bridge --shell /usr/sbin/nologin bridge \
    && install -d -m 0700 -o bridge -g bridge /var/lib/webhook-bridge \
    && install -d -m 0755 /etc/webhook-bridge \
    && install -d -m 0750 -o bridge -g bridge /etc/webhook-bridge/conf.d
USER 10001:10001
WORKDIR /var/lib/webhook-bridge
# The queue database and the generated signing secrets.
VOLUME ["/var/lib/webhook-bridge"]
EXPOSE 9883
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9883/healthz', timeout=4)"]
# SIGTERM (docker stop) drains the work in flight and exits 0: give it time
# (docker stop --time 60, or stop_grace_period in compose).
ENTRYPOINT ["webhook-bridge"]
CMD ["run"]
