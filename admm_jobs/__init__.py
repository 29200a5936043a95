"""Gradient-free (ADMM) retraining of an image classifier on Spark, as Airflow pipeline stages.

Layers, each importing only the ones below it (checked by ``import-linter``, see ``pyproject.toml``)::

    dags/, plugins/                          wiring and the report pages
    orchestration | operations               Airflow glue | deploy targets, cluster, demo, make run
    ingest validate plan train evaluate publish   the six stages (none imports another)
    serving | scoring                        predict, ONNX | scores, plots and the HTML report
    registry | trainer                       model artifact, pointer, versions, history | ADMM on Spark
    lake                                     storage by URI, IDX, landing, batches, datasets
    cli                                      config dataclasses -> CLI, the command runner
"""
