# syntax=docker/dockerfile:1
#
# The project in a container, ready for `dvc repro` and `accelerate launch`, on one GPU or many.
#
#   docker build -t ssd-pipeline .
#   docker run --rm --gpus all --shm-size=8g -v "$PWD:/home/app/project" ssd-pipeline dvc repro
#   docker run --rm --gpus all --shm-size=8g -v "$PWD:/home/app/project" ssd-pipeline \
#       accelerate launch --config_file configs/accelerate/default.yaml --multi_gpu --num_processes 8 \
#       -m pipeline.train --section train_voc
#
# Mounting the checkout (with its .git, data and models) is how the image is meant to run: the
# outputs land on the host and DVC sees the repository. Without a mount it runs the copy of the
# sources baked in (no .git: DVC is set to work without one, below).
#
# Base image: python:3.11-slim, not nvidia/cuda:*-runtime. torch's pip wheels carry their own
# CUDA runtime, cuDNN, cuBLAS and NCCL (the nvidia-* pins in constraints.txt); all the container
# needs from the host is the driver, which the NVIDIA Container Toolkit mounts in at `docker run
# --gpus`. A CUDA base image would add ~3 GB of libraries torch never loads. The Python minor
# version must be the one constraints.txt was resolved with (3.11, as in .ci/run): the pins are
# exact, and some exist only as wheels for particular Python versions. The CUDA 13 wheels need a
# host driver of the 580 series or newer.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: a virtual environment with the locked dependencies (compilers stay in this stage).
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# gcc, as on the CI machine, for any pinned package that has no wheel for this platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer: it only changes with the lock file or pyproject.toml,
# not with every edit of the sources. The packages are empty stand-ins at this point.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir -p ssd pipeline && touch ssd/__init__.py pipeline/__init__.py \
    && pip install -c constraints.txt ".[export]"

# Then the project itself, against the same lock file (nothing new is resolved: --no-deps).
COPY ssd ./ssd
COPY pipeline ./pipeline
RUN rm -rf build *.egg-info \
    && pip install --no-deps --force-reinstall -c constraints.txt ".[export]" \
    && pip check

# ---------------------------------------------------------------------------------------------
# runtime: the environment and the project, no compilers.
FROM ${PYTHON_IMAGE} AS runtime

# git: DVC reads the repository of a mounted checkout. The NVIDIA_* variables are what CUDA base
# images set for the container toolkit: expose every GPU, with the compute libraries.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    OMP_WAIT_POLICY=PASSIVE

# A non-root user whose uid matches the usual first user of a Linux host, so files written to
# a mounted checkout belong to whoever ran the container (override with --user).
ARG UID=1000
ARG GID=1000
RUN groupadd --gid "${GID}" app \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash app

COPY --from=build /opt/venv /opt/venv

WORKDIR /home/app/project
COPY --chown=app:app . .
# The build context has no .git (.dockerignore): DVC must then run without git. A mounted
# checkout replaces this directory, .dvc/config.local included, and brings its own .git.
# WORKDIR created the directory as root: hand it to the user, who writes data/, models/, ... here.
RUN printf '[core]\n    no_scm = true\n' > .dvc/config.local \
    && chown app:app . .dvc .dvc/config.local

USER app

CMD ["dvc", "repro"]
