# pmnode image. CPU by default:
#   docker build -t pmnode .
# CUDA: torch's CUDA wheels carry their own runtime, so only the wheel index changes
# (optionally a CUDA base image too, which must provide python3.11 and pip):
#   docker build -t pmnode:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY pmnode ./pmnode
COPY coordinator ./coordinator
COPY configs ./configs
COPY scripts ./scripts
RUN pip install .
ENTRYPOINT ["pmnode"]
CMD ["--help"]
