# certbroker: the broker with its embedded demo configuration (SQLite audit, in-process
# demo adapters, shipped policies). Build: docker build -t certbroker .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    CERTBROKER_HOST=0.0.0.0 \
    CERTBROKER_STATE_DIR=/var/lib/certbroker

WORKDIR /app
COPY pyproject.toml README.md ./
COPY certbroker ./certbroker
RUN pip install --no-cache-dir . \
    && useradd --system --home /var/lib/certbroker certbroker \
    && mkdir -p /var/lib/certbroker && chown certbroker /var/lib/certbroker

USER certbroker
VOLUME /var/lib/certbroker
EXPOSE 50051 9464
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:50051'); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=2).status == 1 else 1)"
CMD ["certbroker", "serve"]
