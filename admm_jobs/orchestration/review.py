"""Human review in the Airflow UI, with the standard provider's human-in-the-loop operators.

* :func:`evidence_task` and :class:`QuarantineReview`: the quarantine review DAG. The evidence task reads the
  quarantine events that started the run, draws a contact sheet of each batch and writes the question's body;
  one review task per batch (mapped) asks a reviewer to release the batch or keep it quarantined, and records
  the answer in the registry history (:mod:`admm_jobs.registry.review`).
* :class:`PublishApproval`: the weekly DAG's task between evaluate and publish, skipped unless the run's
  ``approval`` param asks for a person; a rejection skips publish.

Who may answer is Airflow's permission to update the HITL details of the DAG (``DagAccessEntity.HITL_DETAIL``);
the contact sheet is served by the ``admm_reports`` plugin to users who may read the runs of the review DAG and
of the DAG whose runs root holds it.
"""

from __future__ import annotations

import urllib.parse
from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import conf
from airflow.sdk.exceptions import AirflowSkipException

from admm_jobs.orchestration.assets import quarantine_asset
from admm_jobs.orchestration.uri_roots import confine_uris
from admm_jobs.registry import review

REVIEW_TIMEOUT = timedelta(days=7)  # no answer within a week keeps the batch quarantined
APPROVAL_TIMEOUT = timedelta(days=6)  # a week's run waits at most until the next one is due: then nothing is published
EVIDENCE_TASK = "evidence"
# The admm_reports plugin's route that serves a review run's contact sheet (plugins/admm_reports.py).
CONTACT_SHEET_ROUTE = "admm-reports/quarantine/{dag_id}/{run_id}/{batch}"


def contact_sheet_link(dag_id: str, run_id: str, batch: str) -> str:
    """The plugin's address of a batch's contact sheet: relative to the UI's ``<base href>``, absolute when
    ``[api] base_url`` is set (as the plugin's report links)."""
    route = CONTACT_SHEET_ROUTE.format(**{name: urllib.parse.quote(value, safe="") for name, value in
                                          {"dag_id": dag_id, "run_id": run_id, "batch": batch}.items()})
    base_url = conf.get("api", "base_url", fallback="")
    return urllib.parse.urljoin(base_url.rstrip("/") + "/", route) if base_url else route


def quarantines(extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One review item per batch of a quarantine event's extra (see ``tasks.request_review_task``)."""
    return [{"batch": batch, "registry_uri": extra["registry_uri"], "run_uri": extra["run_uri"],
             "dataset_uri": extra["dataset_uri"], "dataset_version": record["dataset_version"],
             "logical_date": record["logical_date"], "failures": record["failures"],
             "result_uri": record["result_uri"]}
            for batch, record in sorted(extra["quarantined"].items())]


def evidence_task(triggering_asset_events=None, dag_run=None) -> list[dict[str, Any]]:
    """The keyword arguments of one :class:`QuarantineReview` per quarantined batch of the events that started
    this run: subject, body (failed checks and contact sheet) and the quarantine it decides on.

    The storage URIs come from the events, so they are confined to the allowed roots first.
    """
    items = [item for event in triggering_asset_events.get(quarantine_asset(), ()) for item in quarantines(event.extra)]
    if not items:
        raise AirflowSkipException("no quarantined batch in the events that started this run")
    confine_uris((f"{item['batch']} {name}", item[name])
                 for item in items for name in ("registry_uri", "run_uri", "dataset_uri"))
    reviews = []
    for item in items:
        item["contact_sheet_uri"] = review.write_contact_sheet(item)
        link = contact_sheet_link(dag_run.dag_id, dag_run.run_id, item["batch"])
        reviews.append({"subject": f"Quarantined batch {item['batch']}: release it or keep it out?",
                        "body": review.review_body(item, link, f"{REVIEW_TIMEOUT.days} days"), "quarantine": item})
    return reviews


def _isoformat(when: datetime | str) -> str:
    return when.isoformat() if isinstance(when, datetime) else str(when)


class QuarantineReview(HITLOperator):
    """Release a quarantined batch or keep it out; the answer (or a timeout, which keeps it out) goes into the
    registry history with who answered and when."""

    def __init__(self, *, quarantine: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(options=[review.KEEP, review.RELEASE], defaults=[review.KEEP], **kwargs)
        self.quarantine = quarantine

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        answer = super().execute_complete(context, event)
        decision = review.review_decision(answer["chosen_options"], timed_out=bool(event.get("timedout")))
        entry = review.record_review(self.quarantine, decision, answer["responded_by_user"],
                                     _isoformat(answer["responded_at"]))
        self.log.info("batch %s: %s (reviewer %s)", self.quarantine["batch"], decision, entry["reviewer"])
        return answer


class PublishApproval(ApprovalOperator):
    """Between evaluate and publish: skipped unless ``mode`` (the run's ``approval`` param) asks for a person;
    otherwise asks to approve the publish. The answer (a timeout rejects) goes into the registry history."""

    template_fields = (*ApprovalOperator.template_fields, "mode", "registry_uri", "run_uri", "logical_date")

    def __init__(self, *, mode: str, registry_uri: str, run_uri: str, logical_date: str, **kwargs: Any) -> None:
        super().__init__(subject="Publish this run's model?", defaults=ApprovalOperator.REJECT, **kwargs)
        self.mode, self.registry_uri, self.run_uri, self.logical_date = mode, registry_uri, run_uri, logical_date

    def execute(self, context: Any) -> Any:
        evaluation = context["ti"].xcom_pull(task_ids="evaluate")
        flags = review.approval_flags(evaluation)
        if not review.approval_required(self.mode, flags):
            raise AirflowSkipException(f"approval {self.mode!r}: publish does not wait for a person"
                                       + (f" (flags: {'; '.join(flags)})" if flags else ""))
        self.body = review.approval_body(evaluation, flags, self.mode)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        # Recorded first: on a rejection the provider skips publish by raising.
        ti = context["ti"]
        evaluation = ti.xcom_pull(task_ids="evaluate")
        flags = review.approval_flags(evaluation) + (["no answer in time"] if event.get("timedout") else [])
        run = {"logical_date": self.logical_date, "run_uri": self.run_uri,
               "training_key": ti.xcom_pull(task_ids="plan", key="plan")["training_key"]}
        review.record_approval(self.registry_uri, list(event.get("chosen_options") or []) == [self.APPROVE],
                               evaluation, flags, run, event.get("responded_by_user"),
                               _isoformat(event["responded_at"]))
        return super().execute_complete(context, event)
