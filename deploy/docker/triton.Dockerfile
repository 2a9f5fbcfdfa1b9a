# The GPU replica image: NVIDIA's Triton with the TensorRT-LLM backend, plus the mesh package so
# the same image can also run the sidecar. Engines are not baked in: they are mounted at /models
# (deploy/k8s/overlays/gpu-prod). Build from the repo root:
#   docker build -f deploy/docker/triton.Dockerfile -t infermesh/triton-trtllm:0.1.0 .
ARG TRITON_RELEASE=25.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-trtllm-python-py3
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
COPY backends backends
COPY meshctl meshctl
COPY sdk/python sdk/python
COPY deploy deploy
RUN python3 -m venv /opt/infermesh \
 && /opt/infermesh/bin/pip install --no-cache-dir -e '.[engine]' -e sdk/python \
   --config-settings editable_mode=compat \
 && /opt/infermesh/bin/python -m services.common.protogen --out /app
ENV PYTHONUNBUFFERED=1
CMD ["tritonserver", "--model-repository=/models"]
