"""Consensus: how much an answer agrees with the other answers to the same prompt.

Where a policy writes K answers to one prompt (the generate step does, and a ranking task
shows them together), an answer that says what most of the others say is more often the
right one: an invented fact is rarely invented the same way twice. This is the idea behind
self-consistency (Wang et al., 2022) and minimum-Bayes-risk selection (Kumar & Byrne,
2004), read here as one feature column beside the backbone's: the mean cosine similarity of
an answer's features to those of its siblings, minus the mean of that over the prompt's
answers. Centered so that it only ranks answers within a prompt: a prompt with one answer
or two (a plain pairwise task, whose two answers agree with each other equally) gets 0, and
the probe then ranks them on the backbone's features alone.

Measured on FineGrainedRLHF's training questions (four answers per question,
docs/benchmarks.md): this column alone ranks 0.59 of the judged pairs right, and beside
MiniLM's features the probe's cross-validated accuracy rose from 0.561 to 0.603. The probe
offers it to its cross-validation (training/reward_probe.py `fit_probe`), which keeps it
only where it lowers the cross-validated loss.

The consequence for scoring: an answer's reward then depends on the other answers to its
prompt that are scored with it (RewardModel.score groups each call's answers by prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def consensus(prompts: Sequence[str], features: torch.Tensor) -> torch.Tensor:
    """[n]: for each answer (row of `features`, [n, hidden]), the mean cosine similarity of
    its features to those of the other answers with the same prompt, minus that prompt's
    mean of it; 0 for a prompt with fewer than three answers."""
    if len(prompts) != len(features):
        raise ValueError(f"{len(prompts)} prompts but {len(features)} feature rows")
    out = torch.zeros(len(prompts), dtype=torch.float32)
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(row)
    for rows in groups.values():
        if len(rows) < 3:
            continue
        unit = torch.nn.functional.normalize(features[rows].float(), dim=-1)
        similarity = unit @ unit.T
        agreement = (similarity.sum(1) - similarity.diagonal()) / (len(rows) - 1)
        out[rows] = agreement - agreement.mean()
    return out
