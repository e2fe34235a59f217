# The engine's image: `milestones run` by default; `docker run IMAGE migrate` etc. for the other
# commands. The embedded broker/Postgres (`demo`) are not installed: compose provides the real ones.

FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY consumer/ consumer/
COPY schemas/ schemas/
# Wheels of the project and of every dependency, so the final stage needs no compiler or index.
RUN pip wheel --wheel-dir /wheels ".[fast]"

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "milestone-engine[fast]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin milestones
USER milestones
# /metrics, /healthz, /readyz (MILESTONES_METRICS_PORT).
EXPOSE 9464
# Exec form: the engine is PID 1 and receives SIGTERM itself on `docker stop`.
ENTRYPOINT ["milestones"]
CMD ["run"]
