# The API image: HTTP service, migrations and queue client. No torch and no worker code
# (DESIGN §2), which keeps it small and quick to scale.
# Build from the repository root: docker build -f docker/api.Dockerfile .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    APOPTOSIS_HOME=/var/lib/apoptosis

RUN useradd --system --create-home --uid 10001 apoptosis \
    && install -d -o apoptosis -g apoptosis /var/lib/apoptosis

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY service ./service
# The server's packages only (torch is in `worker`). Editable, so that `apoptosis migrate`
# finds alembic.ini and alembic/ beside the service package.
RUN pip install -e ".[server]"

USER apoptosis
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["apoptosis", "api", "--host", "0.0.0.0", "--port", "8000"]
