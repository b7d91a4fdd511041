# The vlm demo in a container; one Dockerfile, two images (docs/deploy.md):
#   docker build --build-arg TORCH=cpu -t vlm:cpu .   CPU-only torch wheels (about 1.9 GB)
#   docker build -t vlm:cuda .                        PyPI's CUDA build (about 6.7 GB)
#   docker run --rm -p 7860:7860 -v vlm-hf:/home/user/.cache/huggingface \
#       -v vlm-indexes:/home/user/.cache/vlm/indexes vlm:cpu
FROM python:3.11-slim

# TORCH=cpu installs the torch and torchvision that requirements.txt pins from PyTorch's
# CPU-only index (2.14.1+cpu satisfies torch==2.14.1): no CUDA, no NVIDIA libraries, no triton.
# TORCH=cuda (the default) takes PyPI's builds, which bring about 4.8 GB of CUDA libraries
# (NVIDIA's, triton, torch's own) and run on a CPU too. TORCH_INDEX: a mirror of the CPU index.
ARG TORCH=cuda
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    HF_HOME=/home/user/.cache/huggingface \
    VLM_INDEX_DIR=/home/user/.cache/vlm/indexes

# tini becomes PID 1: the kernel gives PID 1 no default signal actions, so python there would
# ignore docker stop's SIGTERM and be killed 10 s later. Under tini, python dies on it at once.
# Hugging Face Spaces runs containers as user 1000; so do we. The volumes' folders exist
# before VOLUME below so that new volumes belong to that user.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 user \
    && install -d -o user -g user /home/user/.cache /home/user/.cache/huggingface \
        /home/user/.cache/vlm /home/user/.cache/vlm/indexes
WORKDIR /home/user/app

COPY --chown=user requirements.txt .
RUN case "$TORCH" in \
        cpu) pip install --index-url "$TORCH_INDEX" \
                $(grep -oE '^torch(vision)?==[^ #;]+' requirements.txt) ;; \
        cuda) ;; \
        *) echo "TORCH must be cpu or cuda, not '$TORCH'" >&2; exit 1 ;; \
    esac \
    && pip install -r requirements.txt \
    && if [ "$TORCH" = cpu ]; then ! pip list 2>/dev/null | grep -iE '^(nvidia-|triton )'; fi

COPY --chown=user . .
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH

# Downloaded models (the hub's cache) and the search galleries saved with --shared-index
# outlive the container when these are named volumes: docker run -v NAME:PATH.
VOLUME ["/home/user/.cache/huggingface", "/home/user/.cache/vlm/indexes"]

EXPOSE 7860
# python's urllib, as slim images have no curl; the start period covers loading a big model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/' % os.environ.get('GRADIO_SERVER_PORT', '7860'), timeout=8)" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "app.py"]
