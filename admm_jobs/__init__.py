"""Gradient-free (ADMM) training of ReLU networks on Spark, as Airflow pipeline stages."""
