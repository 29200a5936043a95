# The job's artifacts for EMR and EMR Serverless, the virtualenv built on the clusters' OS
# (Amazon Linux 2023, as EMR 7.x) from /usr/bin/python3.11, the interpreter its links point
# to and which the cluster provides (emr-serverless.Dockerfile image, or
# emr/bootstrap-python311.sh on EMR on EC2).
#
#   docker build -f infra/docker/venv-builder.Dockerfile --output dist/emr .
FROM --platform=linux/amd64 public.ecr.aws/amazonlinux/amazonlinux:2023 AS build
RUN dnf install -y python3.11 python3.11-pip tar gzip && dnf clean all
RUN python3.11 -m pip install --no-cache-dir venv-pack==0.2.0
WORKDIR /src
COPY pyproject.toml requirements.lock ./
COPY admm_jobs ./admm_jobs
COPY infra/build.py infra/requirements-runtime.txt ./infra/
RUN python3.11 infra/build.py --out /out --python /usr/bin/python3.11

FROM scratch
COPY --from=build /out/ /
