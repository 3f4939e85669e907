# notification-hub node image: slim, non-root, with a health check.
#   docker build -t notification-hub .
#   docker run -p 8000:8000 notification-hub          # SQLite in /data, in-process broker
# Settings come from the environment (docs/operations.md). One container = one node.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hub ./hub
COPY api ./api
COPY actors ./actors
COPY storage ./storage
COPY bridge ./bridge
# Wheels of the hub and every dependency; the runtime stage installs them offline.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ARG HUB_UID=10001
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HUB_DATA_DIR=/data
RUN useradd --create-home --uid "${HUB_UID}" --user-group hub \
    && mkdir -p /data && chown hub:hub /data
# A bind mount (BuildKit, Docker's default builder) keeps the wheels out of the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels notification-hub
USER hub
WORKDIR /home/hub
VOLUME ["/data"]
EXPOSE 8000
# Liveness only (/health): a node whose Redis or RabbitMQ is down is alive and must not
# be restarted; load balancers and Kubernetes use /ready to take it out of rotation.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# SIGTERM: stop accepting, close WebSockets with 1001, finish in-flight requests within
# SHUTDOWN_TIMEOUT_S, exit 0. Give the container longer than that to stop.
STOPSIGNAL SIGTERM
CMD ["hub", "serve", "--host", "0.0.0.0", "--port", "8000"]
