"""The operations wing: where and how the pipeline runs (deploy targets, a local standalone Spark cluster,
``make run``'s one-shot DAG run, the retraining demo through a real Airflow)."""
