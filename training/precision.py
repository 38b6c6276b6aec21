"""Which floating-point precision a path runs in: bfloat16 where the hardware has it.

`LS_RLHF_DTYPE` is `auto` by default: bfloat16 on a GPU that supports it and on a CPU with
native bfloat16 instructions (AVX512-BF16 or AMX), float32 elsewhere. Measured on this
project's 2-core AVX512-BF16 CPU (docs/benchmarks.md): reward scoring with bfloat16 weights
1.9x faster, a reward training step under bfloat16 autocast 1.3-1.6x, generation 1.56x. A CPU
without those instructions emulates bfloat16 and gets slower, so `auto` keeps float32 there.

How each path uses it:
* reward scoring and generation load the weights in bfloat16 (inference only);
* reward training keeps float32 master weights and runs forward and backward under
  bfloat16 autocast (the Trainer's `bf16=True`), so the optimizer's updates do not round.
"""

from __future__ import annotations

import functools
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16")
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX); Linux only."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_CPU_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def bf16_supported() -> bool:
    """bfloat16 runs natively on the device training and scoring would use."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def resolve_dtype(name: str) -> str:
    """`auto` -> `bfloat16` or `float32` for this machine; an explicit name is kept."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if name == "auto":
        return "bfloat16" if bf16_supported() else "float32"
    return name
