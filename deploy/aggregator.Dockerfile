# The aggregator image: `gradwatch aggregator` with the `aggregator` extra only - no torch.
# Build from the repository root (compose.yaml does):
#   docker build -f deploy/aggregator.Dockerfile -t gradwatch-aggregator:0.1.0 .
FROM python:3.12-slim

WORKDIR /src
# Every source root named in pyproject.toml's package-dir, or the build of the wheel fails.
COPY pyproject.toml README.md ./
COPY agent agent
COPY aggregator aggregator
COPY demo demo
COPY dashboards dashboards
COPY wire wire
COPY cli cli
COPY deploy deploy
RUN pip install --no-cache-dir "/src[aggregator]" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin gradwatch \
    && mkdir -p /var/lib/gradwatch && chown 10001 /var/lib/gradwatch

USER 10001
WORKDIR /var/lib/gradwatch
ENV GRADWATCH_AGGREGATOR_HOST=0.0.0.0 \
    GRADWATCH_AGGREGATOR_PORT=9095 \
    GRADWATCH_AGGREGATOR_STATE=/var/lib/gradwatch/aggregator.sqlite
VOLUME /var/lib/gradwatch
EXPOSE 9095
HEALTHCHECK --interval=30s --timeout=5s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9095/healthz', timeout=4)"]
ENTRYPOINT ["gradwatch", "aggregator"]
