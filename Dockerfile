# syntax=docker/dockerfile:1
#
# Grad-CAM explanation service on a CUDA-capable PyTorch runtime.
#
#   docker build -t gradcam-service .
#   docker run --gpus all -p 8000:8000 gradcam-service
#
# or, with the GPU reservation, the models file and the cache volume wired up:
#
#   docker compose up --build
#
# The base image already ships torch and torchvision built against CUDA 12.4; pip keeps them
# (they satisfy the project's lower bounds) and only adds the remaining dependencies.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ARG APP_USER=gradcam
ARG APP_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    HF_HOME=/var/cache/gradcam/huggingface \
    TORCH_HOME=/var/cache/gradcam/torch \
    GRADCAM_HOST=0.0.0.0 \
    GRADCAM_PORT=8000

WORKDIR /opt/gradcam/src

# Dependencies first: this layer is rebuilt only when pyproject.toml (or README.md, which is the
# package's long description) changes, not on every edit of the code. A placeholder package
# lets pip resolve and install the dependencies; the real code replaces it below.
COPY pyproject.toml README.md ./
RUN mkdir service \
    && touch service/__init__.py \
    && pip install --no-cache-dir . \
    && rm -rf service build ./*.egg-info

# The service itself, without touching the dependencies installed above.
COPY service/ ./service/
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && rm -rf build ./*.egg-info

# Unprivileged user owning the model cache (timm/Hugging Face hub and torch hub downloads).
# The directory is created and chowned before VOLUME so that a fresh named volume inherits it.
RUN useradd --create-home --no-log-init --uid "${APP_UID}" --user-group "${APP_USER}" \
    && mkdir -p "${HF_HOME}" "${TORCH_HOME}" \
    && chown -R "${APP_USER}:${APP_USER}" /var/cache/gradcam
VOLUME ["/var/cache/gradcam"]

USER ${APP_USER}
WORKDIR /home/${APP_USER}

EXPOSE 8000

# /readyz answers 200 only once every model is loaded; the first start may download weights,
# hence the long start period. urlopen raises (exit 1) on a non-2xx answer or no answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request; port=os.environ.get('GRADCAM_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4).status == 200 else 1)"]

# uvicorn handles SIGTERM: it stops accepting connections and finishes in-flight requests.
STOPSIGNAL SIGTERM
CMD ["gradcam-service"]
