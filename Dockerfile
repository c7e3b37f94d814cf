# linectl image: the controller (`linectl run`) and the bundled PLC simulators (`linectl sim`).
#
#   docker build -t linectl:local .
#   docker run --rm linectl:local config check
#
# Two stages so that the runtime image holds the installed package and its dependencies,
# not the source tree or the build tools.
FROM python:3.11-slim AS build

WORKDIR /src
# Only what the package build reads (pyproject.toml names README.md as the readme).
COPY pyproject.toml README.md ./
COPY linectl/ linectl/
COPY simulators/ simulators/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[historian]"

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "linectl[historian]" \
    && rm -rf /wheels

# A dedicated unprivileged user; its home is the state directory that holds the records.
RUN groupadd --system linectl \
    && useradd --system --gid linectl --home-dir /var/lib/linectl --no-create-home \
       --shell /usr/sbin/nologin linectl \
    && mkdir -p /var/lib/linectl/records \
    && chown -R linectl:linectl /var/lib/linectl

# The reference configuration as a default; a deployment mounts its own over /etc/linectl
# (read-only: linectl never writes its configuration).
# config/ is a link to the package's reference configuration: copy what it points at.
COPY linectl/reference/ /etc/linectl/

# /etc/linectl is root's and read-only to the daemon, so the records (relative to the
# configuration directory by default) go to the state directory instead. A volume there
# keeps them across container restarts and image upgrades.
ENV LINECTL_CONFIG_DIR=/etc/linectl \
    LINECTL_RECORDS__PATH=/var/lib/linectl/records/linectl.sqlite
VOLUME ["/var/lib/linectl"]

USER linectl
WORKDIR /var/lib/linectl

# Prometheus metrics (bound to loopback unless LINECTL_METRICS__HOST says otherwise).
EXPOSE 9108

ENTRYPOINT ["linectl"]
CMD ["run", "--config", "/etc/linectl"]
