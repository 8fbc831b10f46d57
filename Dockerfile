# A slim, non-root image that runs `taskrelay serve`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY migrations ./migrations
RUN pip install --no-cache-dir --upgrade pip build \
 && python -m build --wheel --outdir /wheels .

FROM python:3.11-slim
# Listening on every interface (0.0.0.0) is no address a provider can call back, so
# TASKRELAY_PUBLIC_URL has no default here: set it when running the image (`serve` refuses to
# start without it), as TASKRELAY_API_TOKENS and TASKRELAY_SECRET_KEY, e.g.
#   docker run -e TASKRELAY_PUBLIC_URL=https://relay.example.com -e ... taskrelay
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TASKRELAY_HOST=0.0.0.0 \
    TASKRELAY_PORT=8000 \
    TASKRELAY_DATA_DIR=/data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /data --create-home taskrelay
USER taskrelay
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TASKRELAY_PORT', '8000'), timeout=4)"]
CMD ["taskrelay", "serve"]
