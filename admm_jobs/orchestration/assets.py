"""The pipeline's Airflow Assets (lineage). The lake and the registry are run parameters, so the assets
have logical URIs (``x-admm://...``); each event's extra says where the data or model really is."""

from __future__ import annotations

from airflow.sdk import Asset, AssetAlias

from admm_jobs.registry.store import DEFAULT_MODEL_NAME


def validated_dataset_asset(dataset_name: str = "mnist") -> Asset:
    """The Asset a passed validation updates: logical identity ``x-admm://lake/<dataset>``.

    Each event's extra says which dataset version passed and where it is
    (see :func:`admm_jobs.orchestration.tasks.validate_task`).
    """
    return Asset(name=f"{dataset_name}-validated-dataset", uri=f"x-admm://lake/{dataset_name}", group="dataset")


def published_model_asset(model_name: str = DEFAULT_MODEL_NAME) -> Asset:
    """The Asset of the published model: updated only when the gate accepts a new version.

    Logical identity ``x-admm://registry/<model_name>``; each event's extra says where the version is
    (see :func:`admm_jobs.orchestration.tasks.publish_task`).
    """
    return Asset(name=f"{model_name}-published-model", uri=f"x-admm://registry/{model_name}", group="model")


def publications_alias(model_name: str = DEFAULT_MODEL_NAME) -> AssetAlias:
    """The publish task's outlet: events are added to it at run time, so a rejected model emits none."""
    return AssetAlias(name=f"{model_name}-publications", group="model")


def quarantine_asset(dataset_name: str = "mnist") -> Asset:
    """The Asset a quarantine updates: logical identity ``x-admm://lake/<dataset>/quarantine``; it schedules the
    quarantine review DAG. Each event's extra names the quarantined batches and where their evidence is
    (see :func:`admm_jobs.orchestration.tasks.request_review_task`)."""
    return Asset(name=f"{dataset_name}-quarantine", uri=f"x-admm://lake/{dataset_name}/quarantine", group="dataset")
