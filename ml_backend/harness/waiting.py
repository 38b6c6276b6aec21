"""Polling until something holds: what the tests and benchmarks do while a real Label
Studio or backend works in another process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T], timeout: float = 120.0, every: float = 0.3, what: str = "condition"
) -> T:
    """`check()`'s first truthy value, polled every `every` seconds; TimeoutError naming
    `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not met in {timeout:.0f} s")
