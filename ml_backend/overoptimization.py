"""An overoptimization alarm that needs no gold judge: the loop watches its own proxy.

Real users have no gold judge, but every round they label the answers of the policy the
proxy reward model trained. Those fresh labels are a test set the proxy has never seen, on
exactly the answers it was optimized to like: its accuracy there ("live accuracy") is how
well it still agrees with people where it matters. Gao et al. (2022) show the proxy reward
going on rising while the gold reward falls once a policy is pushed far enough; what a
product can see of that is the proxy rising while live accuracy falls, or the policy moving
far from the base (KL).

So after a PPO step the job checks:

* the proxy's reward rose during the step while live accuracy fell by more than
  `loop_alarm_accuracy_drop` from the previous round's (measured on fewer than
  `MIN_FRESH_PAIRS` fresh pairs it is too noisy to compare, and nothing is said);
* the new policy's KL to the base is past `loop_max_kl` (0: no bound).

Either keeps the new policy version out of serving (it stays in the registry, unpromoted,
for a person to look at), and the job's result and the log say why.
"""

from __future__ import annotations

import logging
from typing import Any

from ml_backend.serving import BASE_POLICY_LABEL
from training.datasets import preference_dataset
from training.feedback import parse_export
from training.registry import Registry
from training.reward import RewardModel, pair_key, trained_pairs
from training.reward_eval import reward_differences

log = logging.getLogger(__name__)

MIN_FRESH_PAIRS = 20
LIVE_ACCURACY = "live_accuracy"  # the key in job metrics and policy version metadata


def live_accuracy(tasks: list[dict], config: str, registry: Registry) -> dict[str, Any]:
    """The served reward version's accuracy on the fresh labels of the served policy's
    answers (tasks it wrote, pairs that version has not trained on); {} when there is no
    served reward version or no such pair."""
    reward = registry.current("reward")
    if reward is None:
        return {}
    policy = registry.current("policy")
    label = policy.label if policy else BASE_POLICY_LABEL
    mine = [t for t in tasks if (t.get("data") or {}).get("policy_version") == label]
    if not mine:
        return {}
    pairs = preference_dataset(parse_export(mine, config).records)
    seen = trained_pairs(reward.path)
    keep = [
        i
        for i, row in enumerate(
            zip(pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True)
        )
        if pair_key(*row) not in seen
    ]
    if not keep:
        return {}
    fresh = pairs.select(keep)
    model = RewardModel.load(reward.path)
    # Both answers of every pair in one call, as the suggestions score them.
    difference = reward_differences(model.score, fresh)
    right = float((difference > 0).sum() + 0.5 * (difference == 0).sum())
    return {
        LIVE_ACCURACY: right / len(fresh),
        "fresh_pairs": len(fresh),
        "fresh_labels_of": label,
        "judged_by": reward.label,
    }


def previous_live_accuracy(registry: Registry) -> float | None:
    """Live accuracy recorded by the latest policy step (promoted or not), if any."""
    versions = registry.versions("policy")
    if not versions:
        return None
    value = versions[-1].metadata.get(LIVE_ACCURACY)
    return float(value) if value is not None else None


def alarm_reasons(
    live: dict[str, Any],
    previous: float | None,
    score_first: float,
    score_last: float,
    kl: float,
    max_kl: float,
    accuracy_drop: float,
) -> list[str]:
    """Why the new policy should not be served; [] when nothing is wrong."""
    reasons = []
    accuracy = live.get(LIVE_ACCURACY)
    if (
        accuracy is not None
        and previous is not None
        and live.get("fresh_pairs", 0) >= MIN_FRESH_PAIRS
        and score_last > score_first
        and accuracy < previous - accuracy_drop
    ):
        reasons.append(
            f"the proxy reward rose ({score_first:+.4f} -> {score_last:+.4f}) while its accuracy "
            f"on fresh labels fell ({previous:.3f} -> {accuracy:.3f} on {live['fresh_pairs']} pairs)"
        )
    if max_kl > 0 and kl > max_kl:
        reasons.append(f"KL to the base policy {kl:.2f} is past the bound {max_kl:g}")
    return reasons
