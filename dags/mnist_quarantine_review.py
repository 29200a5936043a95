"""Review of quarantined MNIST batches by a person, in the Airflow UI (wiring only; logic lives in admm_jobs).

Scheduled on the asset `mnist-quarantine` (`x-admm://lake/mnist/quarantine`): the weekly DAG's
`request_review` task updates it when `validate` quarantined batches (the weekly run still fails and
nothing downstream of validate runs). `evidence` draws a contact sheet of each batch next to the
quarantining run's outputs and writes the question; one `review` task per batch (human in the loop,
under *Required actions*) offers "Keep quarantined" or "Release batch", showing each failed check with
its observed value and bound and the contact sheet (served by the `admm_reports` plugin). No answer
within 7 days keeps the batch quarantined. Every answer goes into the registry history (`released`,
`confirmed`, `timed_out`, with the reviewer and the time); a released batch is included by the next
weekly run without being checked again. Who may answer: Airflow's permission on this DAG's HITL details.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

from admm_jobs.orchestration import review
from admm_jobs.orchestration.assets import quarantine_asset
from admm_jobs.orchestration.failures import fail_fast

with DAG(
    dag_id="mnist_quarantine_review",
    description="A person releases a quarantined MNIST batch or keeps it out of training",
    doc_md=__doc__,
    schedule=[quarantine_asset()],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["mnist", "admm", "review"],
) as dag:
    evidence = PythonOperator(task_id=review.EVIDENCE_TASK, python_callable=fail_fast(review.evidence_task))
    review.QuarantineReview.partial(task_id="review", response_timeout=review.REVIEW_TIMEOUT).expand_kwargs(
        evidence.output)
