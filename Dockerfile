# gs_lightning on CUDA GPUs. The base image already has a CUDA build of torch, which
# satisfies the package's `torch>=2.4`, so pip keeps it (no CPU constraint here).
#   docker build -t gs-lightning .
#   docker run --gpus all -v $PWD/runs:/work/runs gs-lightning fit --config configs/quickstart.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /work
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY gs_lightning ./gs_lightning
COPY callbacks ./callbacks
COPY configs ./configs
RUN pip install --no-cache-dir .

ENTRYPOINT ["python", "-m", "gs_lightning"]
CMD ["--help"]
