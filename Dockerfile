# Worker image: nas3d on PyTorch's CUDA runtime image. Build context: the repository root.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
WORKDIR /opt/nas3d
# Graphviz's `dot` draws each trial's architecture picture (without it, trials train but get no picture).
RUN apt-get update && apt-get install -y --no-install-recommends graphviz && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY nas3d ./nas3d
COPY studies ./studies
RUN pip install --no-cache-dir ".[postgres,s3]"  # s3: --artifacts s3://... (docker-compose.yml)
ENV NAS3D_HOME=/var/lib/nas3d
ENTRYPOINT ["nas3d"]
