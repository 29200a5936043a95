"""The quality gate's thresholds: publish applies them, and plan keys its decisions by them too."""

from __future__ import annotations

import dataclasses

from admm_jobs.cli.config import setting, validate_fields


@dataclasses.dataclass(frozen=True)
class GateSettings:
    """The gate's thresholds (defaults and how they were sized: see the README, "Quality gate")."""

    min_accuracy: float = setting(0.85, "publish only at or above this test accuracy", minimum=0, maximum=1)
    max_regression: float = setting(0.002, "publish only if test accuracy is at most this much below the published "
                                    "model's", minimum=0, maximum=1)
    max_batch_regression: float = setting(0.0, "publish only if accuracy on the newest batch is at most this much "
                                          "below the published model's", minimum=0, maximum=1)
    max_class_regression: float = setting(0.025, "publish only if no class's recall on the test set is more than this "
                                          "much below the published model's", minimum=0, maximum=1)
    challenger_false_alarm_rate: float = setting(
        0.001, "chance that the challenger check rejects a challenger trained on a clean newest batch (family-wise "
        "over the classes; 0 turns the check off): a class fails when the challenger adopts the given labels of "
        "the batch's images the champion calls wrong beyond the champion's test error rate", minimum=0, maximum=1)

    def __post_init__(self) -> None:
        validate_fields(self)
