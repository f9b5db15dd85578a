# One image for the llmgate processes of the docker compose deployment (compose/docker-compose.yml):
# the controller sidecar, proxycore, authsvc and fake-vllm (the demo backends). nginx itself runs
# from the official nginx image. Build from the repository root: docker build -t llmgate:local .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# nginx and its njs module are here only so that `llmgate sidecar` can `nginx -t` a config before the
# nginx container loads it; no nginx serves from this image. Unpinned: Debian's security updates
# replace pinned versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx libnginx-mod-http-js \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric user: the compose file runs nginx as the same user, so the sidecar may signal it and
# both may write the shared volumes.
RUN groupadd --system --gid 10001 llmgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /opt/llmgate --shell /usr/sbin/nologin llmgate \
 && install -d -o 10001 -g 10001 /run/llmgate /var/log/llmgate

WORKDIR /opt/llmgate
COPY pyproject.toml README.md /tmp/src/
COPY controller/ /tmp/src/controller/
COPY proxycore/ /tmp/src/proxycore/
COPY authsvc/ /tmp/src/authsvc/
COPY fakevllm/ /tmp/src/fakevllm/
COPY templates/ /tmp/src/templates/
COPY nginx/ /tmp/src/nginx/
# A plain install: templates/ and nginx/ ship as package data, and the sources do not stay in the image.
# The code stays owned by root: the runtime user cannot change it.
RUN pip install --no-cache-dir /tmp/src \
 && rm -rf /tmp/src

USER 10001:10001
ENTRYPOINT ["llmgate"]
# Alone, the image is a drop-in for `litellm --config`: mount a config.yaml at /etc/llmgate/config.yaml.
CMD ["proxy", "--config", "/etc/llmgate/config.yaml", "--host", "0.0.0.0", "--port", "4000"]
