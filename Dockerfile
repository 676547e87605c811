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

HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"

ENTRYPOINT ["easybackend"]
CMD ["serve"]
