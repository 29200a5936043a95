# Dataproc Serverless custom container: Python 3.11 with the job's packages. Dataproc mounts
# Java and Spark at run time, so the image brings neither; it needs procps and tini and a
# "spark" user with uid/gid 1099.
#
#   docker build --platform linux/amd64 -f infra/docker/dataproc.Dockerfile -t "$IMAGE_REPOSITORY/train-runtime:0.1.0" .
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends procps tini \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.lock infra/requirements-runtime.txt /tmp/
RUN pip install --no-cache-dir --only-binary=:all: --constraint /tmp/requirements.lock \
        --requirement /tmp/requirements-runtime.txt \
    && rm /tmp/requirements.lock /tmp/requirements-runtime.txt
ENV PYSPARK_PYTHON=/usr/local/bin/python
RUN groupadd -g 1099 spark && useradd -u 1099 -g 1099 -d /home/spark -m spark
USER spark
