# Image for the api, the worker and the migrate job (same code, different commands).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

# Runtime dependencies first, read from pyproject.toml, so this layer is rebuilt only when
# they change. Optional extras (dev: embedded Temporal/PostgreSQL binaries; test) stay out.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (alembic.ini, migrations/ and journeys/ stay in /app for the commands).
COPY . .
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && mkdir -p /app/.data && chown app:app /app/.data

USER app

EXPOSE 8000
CMD ["python", "worker.py"]
