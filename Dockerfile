# alpa-tune worker image: CUDA PyTorch from PyPI, the package, the study configs.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY alpa_tune ./alpa_tune
COPY studies ./studies
RUN pip install --no-cache-dir .
# Decoded-image cache shared by the workers of one host (mount a volume here).
ENV XDG_CACHE_HOME=/cache PYTHONUNBUFFERED=1
# SIGTERM (docker stop, compose down) stops a worker at the next epoch and re-queues its trial.
STOPSIGNAL SIGTERM
ENTRYPOINT ["alpa-tune"]
