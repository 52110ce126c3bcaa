"""The progress line's speed numbers (megamoe.training.speed) from a fake clock, and the lines
the progress callback prints: per step, while the final checkpoint is saved, and at the end."""

from __future__ import annotations

import io
import sys

import pytest

from megamoe.training.callbacks import ProgressCallback, closing_line
from megamoe.training.speed import SpeedMonitor, format_count, format_duration


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_speed_is_averaged_over_the_window_and_the_eta_uses_it():
    clock = FakeClock()
    speed = SpeedMonitor(total_steps=10, window=3, clock=clock)
    out = []
    for step, seconds in enumerate([4.0, 1.0, 2.0, 3.0], start=1):   # step 1: warm-up
        clock.now += seconds
        out.append(speed.update(step, tokens=600, consumed_tokens=600 * step))
    first, last = out[0], out[-1]
    assert first["step_time_ms"] == pytest.approx(4000)
    assert first["tokens_per_s_avg"] == pytest.approx(150)
    assert first["eta_s"] == pytest.approx(9 * 4.0)
    # the window holds steps 2..4 only (1 + 2 + 3 s for 1800 tokens): the warm-up is gone
    assert last["step_time_ms"] == pytest.approx(2000)
    assert last["tokens_per_s_avg"] == pytest.approx(1800 / 6)
    assert last["eta_s"] == pytest.approx(6 * 2.0)                  # steps 5..10 left
    assert last["elapsed_s"] == pytest.approx(10.0)
    assert last["consumed_tokens"] == 2400


def test_a_resumed_run_counts_the_eta_from_its_own_steps():
    clock = FakeClock()
    speed = SpeedMonitor(total_steps=100, window=10, clock=clock)
    clock.now += 0.5
    m = speed.update(91, tokens=10, consumed_tokens=910)           # resumed at step 90
    assert m["eta_s"] == pytest.approx(9 * 0.5) and m["elapsed_s"] == pytest.approx(0.5)
    assert m["consumed_tokens"] == 910


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (59.6, "1:00"), (75, "1:15"),
                                          (3725, "1:02:05")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("n,text", [(0, "0"), (512, "512"), (1200, "1.2k"),
                                    (1_234_567, "1.23M"), (999_999, "1M"), (3.4e9, "3.4G")])
def test_format_count(n, text):
    assert format_count(n) == text


def metrics(**extra) -> dict:
    return {"loss": 3.25, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
            "imbalance": 1.1, "step_time_ms": 250.0, "tokens_per_s_avg": 4096.0,
            "elapsed_s": 65.0, "eta_s": 3700.0, "consumed_tokens": 1_200_000, **extra}


def test_progress_line_has_speed_eta_and_consumed_tokens(capsys):
    cb = ProgressCallback(total_steps=20, log_interval=5, enabled=False)
    cb.on_step(4, metrics())
    cb.on_step(5, metrics())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1                                          # every log_interval steps
    parts = lines[0].removeprefix("[megamoe] ").split(" | ")
    assert parts[:4] == ["step 5/20", "loss 3.2500", "lr 1.00e-03", "grad 0.500"]
    # the smoothed tokens/s, not this step's 1000
    assert parts[4:9] == ["250 ms/step", "tok/s 4096", "1.2M tok", "elapsed 1:05",
                          "ETA 1:01:40"]


def test_final_checkpoint_and_closing_lines(capsys):
    clock = FakeClock()
    cb = ProgressCallback(total_steps=20, log_interval=5, enabled=False, clock=clock)
    cb.on_final_save(20, "runs/x/checkpoints")
    clock.now += 83
    cb.on_end({"steps": 20, "last_loss": 2.5, "val_loss": 2.625, "wall_s": 70.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[megamoe] saving final checkpoint step 20 to runs/x/checkpoints",
                     "[megamoe] finished at step 20 | final loss 2.5000 | validation loss "
                     "2.6250 | wall time 1:23 after start-up (training steps 1:10)"]


def test_closing_line_without_validation():
    line = closing_line({"steps": 3, "last_loss": 1.0, "val_loss": None, "wall_s": 1.0}, 2.0)
    assert "validation" not in line and "final loss 1.0000" in line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_of_a_resumed_run_starts_at_its_step(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", Terminal())
    cb = ProgressCallback(total_steps=100, log_interval=1)
    cb.on_step(91, metrics())
    assert (cb.bar.initial, cb.bar.n) == (90, 91)            # rate and ETA count 1 step, not 91
    assert "tok=1.2M" in sys.stderr.getvalue() and "tok_s=4096" in sys.stderr.getvalue()
    cb.on_end({"steps": 100, "last_loss": 2.5, "val_loss": None, "wall_s": 1.0})
    assert capsys.readouterr().out.startswith("[megamoe] finished at step 100 | final loss 2.5000")
