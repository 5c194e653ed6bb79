# thriftgate as a container (sidecar or standalone). Build: docker build -t thriftgate .
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/thriftgate
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
# The tiktoken encodings are package data (proxy/data): nothing is downloaded at start-up.
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin thriftgate \
    && mkdir -p /var/log/thriftgate \
    && chown thriftgate /var/log/thriftgate
# A named volume mounted here starts out owned by the thriftgate user, so the usage log can be
# written (THRIFTGATE_USAGE_LOG=/var/log/thriftgate/usage.jsonl; deploy/docker-compose.yml).

USER thriftgate
ENV THRIFTGATE_HOST=0.0.0.0 \
    THRIFTGATE_PORT=8080
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('THRIFTGATE_PORT', '8080') + '/healthz', timeout=2)"]
ENTRYPOINT ["thriftgate"]
CMD ["serve"]
