"""The challenger check after training, before publish: did the challenger adopt labels of the newest batch that
the champion, which never saw that batch, calls wrong, beyond what the champion's error rate explains?

The challenger was trained on the newest batch; the champion was not, so it predicts what the images show. A
trigger stamped on a few percent of a batch's images relabelled to a target class t is memorised by the
challenger: on those images it says t (the given label) and the champion says the digit drawn. Per class c the
statistic is the batch's *adopted share*

    a_c = #{batch images labelled c : challenger says c, champion does not} / #{batch images labelled c},

compared with the champion's error rate on the fixed test set, e_c = #{test images of class c the champion gets
wrong} / #{test images of class c}: held-out data for both. On a clean batch the adopted images are among the
champion's errors there, which occur at about e_c, and the challenger fits only part of them, so a_c stays near
or below e_c; a poisoned class adds the memorised poison on top. The test is a one-sided Fisher exact test of
a_c > e_c (both counts size it); a class fails when its p-value is at most the family-wise false-alarm rate
divided by the number of classes (Bonferroni) and a_c exceeds e_c by more than :data:`MIN_EXCESS`: the batch's
writers are not the test set's, so a clean class can be a little harder in the batch than in the test set, which
a large batch would otherwise make significant. The counts come from :func:`admm_jobs.scoring.metrics.tally` of
both models, summed chunk by chunk, so memory does not grow with the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from admm_jobs.scoring.label_checks import row_share_p_values

if TYPE_CHECKING:  # metrics computes these statistics when publish scores a new champion
    from admm_jobs.scoring.metrics import Tally

CHECK = "challenger adoption"
# Largest excess a_c - e_c over twelve clean 2,000-image MNIST batches: 0.066; a 5 % trigger gave 0.295-0.316 in
# its target class (bench/results/challenger_check.md).
MIN_EXCESS = 0.1
CHALLENGER_ONLY = 0b01  # the bit mask of a Tally of [challenger, champion]: right by the challenger alone


def champion_errors(both: Tally) -> np.ndarray:
    """Per true class, how many examples the champion (the second model of ``both``) gets wrong."""
    confusion = both.confusions[1]
    return confusion.sum(axis=1) - np.diag(confusion)


def adoption_statistics(batch: Tally, test: Tally) -> list[dict[str, Any]]:
    """Per class c, from the tallies of [challenger, champion] on the newest batch and the test set: the batch's
    images labelled c, how many of them the challenger adopts (it says c, the champion does not), the champion's
    test images and errors of class c, and the one-sided p-value of the adopted share exceeding the champion's
    test error rate (see the module docstring)."""
    adopted, batch_images = batch.right_by_class[:, CHALLENGER_ONLY], batch.confusions[0].sum(axis=1)
    errors, test_images = champion_errors(test), test.confusions[0].sum(axis=1)
    statistics = []
    for k in range(len(adopted)):
        testable = batch_images[k] > 0 and test_images[k] > 0
        statistics.append({
            "class": k, "batch_images": int(batch_images[k]), "adopted": int(adopted[k]),
            "adopted_share": float(adopted[k] / batch_images[k]) if batch_images[k] else 0.0,
            "test_images": int(test_images[k]), "champion_test_errors": int(errors[k]),
            "champion_error_rate": float(errors[k] / test_images[k]) if test_images[k] else 0.0,
            "p_value": float(row_share_p_values(adopted[k], batch_images[k], errors[k], test_images[k]))
            if testable else 1.0,
        })
    return statistics


def class_test_level(false_alarm_rate: float, classes: int) -> float:
    """The level of each class's test: the family-wise false-alarm rate split over the classes (Bonferroni)."""
    return false_alarm_rate / classes


def adopted_classes(statistics: list[dict[str, Any]], false_alarm_rate: float) -> list[dict[str, Any]]:
    """The classes of :func:`adoption_statistics` whose p-value is at most their test level and whose adopted
    share exceeds the champion's error rate by more than :data:`MIN_EXCESS`, each with the ``level`` it was
    tested at."""
    level = class_test_level(false_alarm_rate, len(statistics))
    return [{**entry, "level": level} for entry in statistics
            if entry["p_value"] <= level and entry["adopted_share"] > entry["champion_error_rate"] + MIN_EXCESS]
