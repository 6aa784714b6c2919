# Worker image: nas3d on PyTorch's CUDA runtime image. Build context: the repository root.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
WORKDIR /opt/nas3d
COPY pyproject.toml README.md ./
COPY nas3d ./nas3d
COPY studies ./studies
RUN pip install --no-cache-dir ".[postgres]"
ENV NAS3D_HOME=/var/lib/nas3d
ENTRYPOINT ["nas3d"]
