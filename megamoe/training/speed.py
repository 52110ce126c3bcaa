"""Training speed as the progress line reports it: wall time per step and tokens/s over the last
few steps, elapsed time, the time left and the tokens consumed so far.

Steps are timed wall clock to wall clock (validation, checkpoints and logging included, as
Megatron-LM's "elapsed time per iteration"), so the ETA is what the user will wait. The per-step
`tokens_per_s` of the loop (the train step alone) stays next to these in the logs.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable


class SpeedMonitor:
    """Feed it once per finished step; it returns the speed metrics of that step.

    `total_steps` is the run's last step (`train.steps`); `window` steps are averaged for
    ms/step, tokens/s and the ETA. `clock` returns seconds (a fake one in tests)."""

    def __init__(self, total_steps: int, window: int = 10,
                 clock: Callable[[], float] = time.perf_counter):
        assert window >= 1, window
        self.total, self.clock = total_steps, clock
        self.start = self.last = clock()
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)   # (seconds, tokens)

    def update(self, step: int, tokens: int, consumed_tokens: int) -> dict:
        """`tokens`: trained in this step; `consumed_tokens`: since step 1 (a resumed run
        counts the steps before the resume too)."""
        now = self.clock()
        self.recent.append((now - self.last, tokens))
        self.last = now
        seconds = sum(s for s, _ in self.recent)
        step_s = seconds / len(self.recent)
        return {
            "step_time_ms": 1000 * step_s,
            "tokens_per_s_avg": sum(n for _, n in self.recent) / seconds if seconds > 0 else None,
            "elapsed_s": now - self.start,
            "eta_s": max(self.total - step, 0) * step_s,
            "consumed_tokens": consumed_tokens,
        }


def format_duration(seconds: float) -> str:
    """H:MM:SS (M:SS under an hour), as tqdm and Megatron print times: 75 → "1:15"."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_count(n: float) -> str:
    """A count with an SI suffix and three significant digits: 1_234_567 → "1.23M"."""
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= 0.9995 * limit:         # 999_999 is "1M", not "1e+03k"
            return f"{n / limit:.3g}{suffix}"
    return f"{n:.0f}"
