"""Models loaded by two threads at once keep the precision each asked for.

transformers builds a model under torch's default dtype, which is process-wide; the backend
reloads a served version in one thread while a training job loads its models in another.
Before loads took `training.models.MODEL_LOADING`, a loop round failed on a float32
reference with bfloat16 weights, and this test saw a float32 load come back in bfloat16 in
about one run of three (six loads each).
"""

from __future__ import annotations

import threading

import torch

from training.models import load_backbone, load_causal_lm


def test_concurrent_loads_in_two_precisions_do_not_mix(tiny_policy_dir, tiny_reward_backbone_dir):
    wrong: list[str] = []
    start = threading.Barrier(2)

    def load(kind: str, dtype: str, expected: torch.dtype) -> None:
        start.wait()
        for _ in range(10):
            if kind == "policy":
                model, _ = load_causal_lm(str(tiny_policy_dir), dtype=dtype)
            else:
                model, _ = load_backbone(str(tiny_reward_backbone_dir), dtype=dtype)
            dtypes = {p.dtype for p in model.parameters()}
            if dtypes != {expected}:
                wrong.append(f"{kind} asked {dtype}, got {sorted(map(str, dtypes))}")

    threads = [
        threading.Thread(target=load, args=("policy", "bfloat16", torch.bfloat16)),
        threading.Thread(target=load, args=("backbone", "float32", torch.float32)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, wrong
