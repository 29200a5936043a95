#!/usr/bin/env bash
# EMR on EC2 bootstrap action: Python 3.11 at /usr on every node, the interpreter the job's
# venv archive (infra/docker/venv-builder.Dockerfile) links to. EMR 7.x runs Amazon Linux 2023.
set -euo pipefail
sudo dnf install -y python3.11
/usr/bin/python3.11 --version
