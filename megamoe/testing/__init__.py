"""Shipped test helpers: pooled multi-process gloo workers and the single-process parity harness.

    from megamoe.testing import run_distributed, parity_task, compare
    ref = run_distributed(parity_task, 1, [], reference_dp=2)[0]
    got = run_distributed(parity_task, 2, ["parallel.expert=2"])[0]
    assert not compare(ref, got)
"""

from megamoe.testing.parity import ParityResult, compare, parity_run, parity_task, tiny_config
from megamoe.testing.pool import WorkerError, run_distributed

__all__ = ["run_distributed", "WorkerError", "parity_task", "parity_run", "compare",
           "ParityResult", "tiny_config"]
