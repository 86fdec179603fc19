# The gateway in a container: `docker build -t gateway .` then
# `docker run -p 8080:8080 -v $PWD/gateway.yaml:/etc/gateway/gateway.yaml gateway`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_HOST=0.0.0.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home gateway
COPY gateway.yaml /etc/gateway/gateway.yaml
USER gateway
WORKDIR /etc/gateway

EXPOSE 8080 9090
# Liveness from the admin listener (127.0.0.1:9090 unless the config says otherwise).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_ADMIN_PORT', '9090') + '/healthz', timeout=2)"

# SIGTERM drains in-flight requests, SIGHUP reloads /etc/gateway/gateway.yaml.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run"]
