# The services image: every mesh service, the sidecar and meshctl; on CPU clusters also the
# engines, through the Triton binary inside the nvidia-pytriton wheel. Build from the repo root:
#   docker build -f deploy/docker/services.Dockerfile -t infermesh/services:0.1.0 .
FROM debian:bookworm-slim
# Debian's python3 (3.11.2): Triton's Python-backend stub links this very libpython3.11.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
COPY backends backends
COPY meshctl meshctl
COPY sdk/python sdk/python
COPY deploy deploy
# Editable in compat mode, as `make install` does: engine model.py files import the repository.
# With the engine and Triton's binary ([engine,local]): the image also runs the CPU engines.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -e '.[engine,local]' -e sdk/python \
   --config-settings editable_mode=compat \
 && /opt/venv/bin/python -m services.common.protogen --out /app
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
CMD ["python", "-m", "services.gateway"]
