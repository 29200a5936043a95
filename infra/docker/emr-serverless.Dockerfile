# EMR Serverless image with Python 3.11 at /usr, the interpreter the venv archive links to
# (EMR 7.x ships Python 3.9; the job needs >= 3.10). Keep the tag equal to the application's
# release label (terraform var emr_release_label).
#
#   docker build --platform linux/amd64 -f infra/docker/emr-serverless.Dockerfile -t "$REPO:0.1.0" .
FROM public.ecr.aws/emr-serverless/spark/emr-7.5.0:latest
USER root
RUN dnf install -y python3.11 && dnf clean all
# EMR Serverless runs jobs as hadoop.
USER hadoop:hadoop
