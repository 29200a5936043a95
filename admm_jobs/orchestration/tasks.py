"""Stage entry points as Airflow task callables: XCom for the plan, asset events for validate and publish, and
the request for a review of quarantined batches.

Each first refuses a command line with a URI outside the allowed roots (:func:`uri_roots.confined`);
the DAG wraps each in :func:`admm_jobs.orchestration.failures.fail_fast`.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

from admm_jobs import evaluate, ingest, plan, publish, validate
from admm_jobs.lake.dataset import load_manifest
from admm_jobs.orchestration.assets import (
    publications_alias,
    published_model_asset,
    quarantine_asset,
    validated_dataset_asset,
)
from admm_jobs.orchestration.uri_roots import confined

ingest_task = confined(ingest.main)
evaluate_task = confined(evaluate.main)


def ingest_on_spark(ingest_on: str) -> bool:
    """For the ``ShortCircuitOperator`` before the Spark ingest job: whether the run asked for it."""
    return ingest_on == "spark"


# validate's and publish's XCom naming the batches they quarantined, for request_review and
# request_review_after_publish
QUARANTINED_KEY = "quarantined"


@confined
def validate_task(argv: list[str], outlet_events=None, ti=None) -> dict[str, Any]:
    """:func:`admm_jobs.validate.main` as an Airflow task: the asset event of a passed validation names the
    dataset version.

    A failed validation raises, so the task fails and emits no event (Airflow records the outlet events of
    successful tasks only). A quarantine first pushes the XCom :data:`QUARANTINED_KEY` (the dataset and the
    quarantine record of each batch), from which :func:`request_review_task` emits the review's event.
    """
    try:
        result = validate.main(argv)
    except validate.BatchQuarantined as quarantined:
        if ti is not None:
            ti.xcom_push(key=QUARANTINED_KEY, value={"dataset_uri": quarantined.result["dataset_uri"],
                                                     "records": quarantined.quarantined})
        raise
    if outlet_events is not None:
        manifest = load_manifest(result["dataset_uri"])
        outlet_events[validated_dataset_asset(manifest["dataset"])].extra = {
            "dataset_uri": result["dataset_uri"],
            "dataset_version": manifest["version"],
            "result_uri": result["result_uri"],
        }
    return result


@confined
def plan_task(argv: list[str], ti=None) -> bool:
    """:func:`admm_jobs.plan.main` for a ``ShortCircuitOperator``: False (nothing new) skips everything downstream.

    The plan goes to XCom under the key ``plan`` (the train task reads ``init_model_uri``).
    """
    result = plan.main(argv)
    if ti is not None:
        ti.xcom_push(key="plan", value=result)
    return result["retrain"]


@confined
def publish_task(argv: list[str], outlet_events=None, ti=None) -> dict[str, Any]:
    """:func:`admm_jobs.publish.main` as an Airflow task: an accepted model becomes an event of
    :func:`published_model_asset`.

    The event's extra is the new registry pointer plus ``model_uri`` and ``model_name``;
    a rejected model, or one that is already the published version, emits no event. When the challenger check
    quarantined the newest batch, the XCom :data:`QUARANTINED_KEY` names it for :func:`request_review_task`.
    """
    result = publish.main(argv)
    if ti is not None and result["quarantined"]:
        ti.xcom_push(key=QUARANTINED_KEY, value={"dataset_uri": result["dataset_uri"],
                                                 "records": result["quarantined"]})
    if outlet_events is not None and result["decision"] == "accepted":
        outlet_events[publications_alias(result["model_name"])].add(
            published_model_asset(result["model_name"]),
            extra={**result["current"], "model_uri": result["model_uri"], "model_name": result["model_name"]},
        )
    return result


def request_review_task(registry_uri: str, run_uri: str, source_task: str = "validate", ti=None,
                        outlet_events=None) -> list[str]:
    """Run after ``source_task`` (validate, ``trigger_rule="one_done"``: passed or failed, not when it never ran;
    or publish, whose challenger check quarantines the batch a poisoned challenger came from): when it
    quarantined batches, emit one event of :func:`quarantine_asset` that starts their review; otherwise skip
    this task (nothing to review).

    The event's extra: ``registry_uri``, ``run_uri`` (the weekly run's outputs, where the contact sheets go),
    ``dataset_uri`` and ``quarantined`` (batch id -> its quarantine record). Returns the batch ids.
    """
    quarantined = ti.xcom_pull(task_ids=source_task, key=QUARANTINED_KEY)
    if not quarantined:
        raise AirflowSkipException(f"{source_task} quarantined no batch: nothing to review")
    manifest = load_manifest(quarantined["dataset_uri"])
    outlet_events[quarantine_asset(manifest["dataset"])].extra = {
        "registry_uri": registry_uri, "run_uri": run_uri, "dataset_uri": quarantined["dataset_uri"],
        "quarantined": quarantined["records"],
    }
    return sorted(quarantined["records"])
