"""A test auth manager for the reports plugin: Airflow's SimpleAuthManager, except that each user may read
the runs of the DAGs listed for them in ``RUN_READERS`` and of no other (a SimpleAuthManager viewer reads all).

Set ``[core] auth_manager`` to ``report_auth.RunReadersAuthManager`` and create it as the API server does
(``airflow.api_fastapi.app.create_auth_manager``); sign users in with the tokens it issues (:func:`token_for`).
"""

from __future__ import annotations

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

AUTH_MANAGER = f"{__name__}.RunReadersAuthManager"
RETRAINING_DAG = "mnist_admm_retraining"
SCORING_DAG = "mnist_scoring"
REVIEW_DAG = "mnist_quarantine_review"

ANALYST = "analyst"  # reads the runs of the retraining and scoring DAGs
SCORER = "scorer"  # reads the runs of the scoring DAG only
REVIEWER = "reviewer"  # reads the runs of the review and retraining DAGs
STRANGER = "stranger"  # signed in, reads the runs of no DAG
RUN_READERS = {ANALYST: {RETRAINING_DAG, SCORING_DAG}, SCORER: {SCORING_DAG}, REVIEWER: {REVIEW_DAG, RETRAINING_DAG},
               STRANGER: set()}


class RunReadersAuthManager(SimpleAuthManager):
    """Grants reading the runs of the DAGs ``RUN_READERS`` lists for the user, and no other DAG access."""

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None) -> bool:
        return (method == "GET" and access_entity is DagAccessEntity.RUN and details is not None
                and details.id in RUN_READERS.get(user.username, set()))


def token_for(username: str) -> str:
    """A JWT the configured auth manager issued for ``username`` (a SimpleAuthManager viewer)."""
    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role="viewer"))
