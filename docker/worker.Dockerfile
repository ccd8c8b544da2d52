# The GPU worker image: Celery worker, pipeline and engine, with the CUDA build of torch.
# Build from the repository root: docker build -f docker/worker.Dockerfile .
#
# The base is python:3.11-slim rather than nvidia/cuda: the project needs Python 3.11, which the
# CUDA images' Ubuntu releases do not ship, and PyTorch's CUDA wheels bring their own CUDA runtime,
# cuBLAS and cuDNN (the nvidia-* wheels), so a CUDA base would only hold a second copy. The host's
# driver is mounted by the NVIDIA Container Toolkit when the container reserves a GPU.
FROM python:3.11-slim-bookworm

# The CUDA variant of PyTorch's wheel index; pick one the host driver supports.
ARG TORCH_CUDA=cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    APOPTOSIS_HOME=/var/lib/apoptosis

RUN useradd --system --create-home --uid 10001 apoptosis \
    && install -d -o apoptosis -g apoptosis /var/lib/apoptosis

# torch first, in its own layer: gigabytes that change only with the pin in pyproject.toml.
RUN pip install "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
RUN pip install ".[worker]"

USER apoptosis
CMD ["apoptosis", "worker", "--queues", "gpu"]
