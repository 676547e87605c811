FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CONVERSATIONS_DIR=/app/conversations

WORKDIR /app
COPY pyproject.toml README.md run.py ./
COPY easybackend ./easybackend
COPY proto ./proto
RUN pip install . \
    && useradd --create-home --uid 10001 easybackend \
    && mkdir -p /app/conversations \
    && chown easybackend /app/conversations

USER easybackend
VOLUME ["/app/conversations"]
EXPOSE 8000 9000 9001

# Readiness, /readyz, over HTTP, or HTTPS when TLS is on (the certificate is not checked: this
# is loopback). Not a TCP probe: the ports accept connections before the server answers, and
# /readyz also says 503 while the database does not answer or takes no writes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python -c "import os, ssl, urllib.request as r; scheme = 'https' if os.environ.get('TLS_CERTFILE') else 'http'; r.urlopen(f\"{scheme}://127.0.0.1:{os.environ.get('HTTP_PORT', '8000')}/readyz\", timeout=4, context=ssl._create_unverified_context())"

ENTRYPOINT ["easybackend"]
CMD ["serve"]
