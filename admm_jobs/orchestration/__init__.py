"""The Airflow wing: what the DAG calls and declares (task callables, fail-fast handling, assets, params).

With ``dags/`` and ``plugins/`` (and the operations wing), the only code that imports Airflow.
"""
