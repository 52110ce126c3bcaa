"""Trainer callbacks, active on rank 0: progress bar, one log line per interval, TensorBoard."""

from __future__ import annotations

import json
import math
import os
import sys
import time

from megamoe.training.speed import format_count, format_duration


class Callback:
    def on_start(self, info: dict) -> None: ...
    def on_step(self, step: int, metrics: dict) -> None: ...
    def on_eval(self, step: int, val_loss: float, extra: dict | None = None) -> None: ...
    def on_final_save(self, step: int, root: str) -> None: ...
    def on_end(self, summary: dict) -> None: ...


def _tokens_per_s(m: dict) -> float:
    """Smoothed over the speed window where there is one, else this step's."""
    avg = m.get("tokens_per_s_avg")
    return m["tokens_per_s"] if avg is None else avg


def _speed(m: dict, unit: str = "tok") -> list[str]:
    """ms/step, units (tokens, images) per second, consumed units, elapsed and ETA
    (megamoe.training.speed); the metric keys say `tokens` whatever the family's unit."""
    if m.get("step_time_ms") is None:
        return [f"{unit}/s {m['tokens_per_s']:.0f}"]
    return [f"{m['step_time_ms']:.0f} ms/step", f"{unit}/s {_tokens_per_s(m):.0f}",
            f"{format_count(m['consumed_tokens'])} {unit}",
            f"elapsed {format_duration(m['elapsed_s'])}", f"ETA {format_duration(m['eta_s'])}"]


def _line(step: int, total: int, m: dict, unit: str = "tok") -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"grad {m['grad_norm']:.3f}", *_speed(m, unit), f"imbalance {m['imbalance']:.2f}"]
    if m.get("load_balancing_loss") is not None:
        parts.append(f"lbl {m['load_balancing_loss']:.3f}")
    if m.get("router/dropped_fraction"):
        parts.append(f"dropped {100 * m['router/dropped_fraction']:.1f}%")
    if m.get("router/threshold") is not None:
        parts.append(f"τ {m['router/threshold']:.3f}")
    if m.get("mor/depth") is not None:
        kept = [v for k, v in m.items() if k.startswith("mor/kept_step_")]
        parts.append("kept " + "/".join(f"{100 * v:.0f}" for v in kept) + "%")
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if m.get("bad_samples"):
        parts.append(f"bad samples {m['bad_samples']}")
    return " | ".join(parts)


def closing_line(summary: dict, total_s: float) -> str:
    """The run's last line: final loss, validation loss and wall time (`total_s`: since the
    model was built, validation and checkpoints included; `wall_s`: the training steps)."""
    parts = [f"finished at step {summary['steps']}"]
    if summary.get("last_loss") is not None:
        parts.append(f"final loss {summary['last_loss']:.4f}")
    if summary.get("val_loss") is not None:
        parts.append(f"validation loss {summary['val_loss']:.4f}")
    if summary.get("val_accuracy") is not None:
        parts.append(f"validation accuracy {summary['val_accuracy']:.4f}")
    wall = f"wall time {format_duration(total_s)} after start-up"
    if summary.get("wall_s") is not None:
        wall += f" (training steps {format_duration(summary['wall_s'])})"
    return " | ".join(parts + [wall])


class ProgressCallback(Callback):
    """A tqdm bar with loss and tokens/s when attached to a terminal; plain lines otherwise
    (every `log_interval` steps), so batch jobs get readable logs."""

    def __init__(self, total_steps: int, log_interval: int, enabled: bool = True,
                 clock=time.perf_counter, unit: str = "tok"):
        self.total, self.interval, self.clock = total_steps, log_interval, clock
        self.unit = unit      # what the speed counts: tok (tokens) or img (images)
        self.use_bar = enabled and sys.stderr.isatty()
        self.bar = None
        self.started = clock()

    def _print(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else print)(msg)
        sys.stdout.flush()

    def on_start(self, info: dict) -> None:
        for key, value in info.items():
            print(f"[megamoe] {key}: {value}", flush=True)

    def on_step(self, step: int, m: dict) -> None:
        if self.use_bar and self.bar is None:   # made at the first step: a resume starts there
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=step - 1, unit="step", dynamic_ncols=True)
        if self.bar is not None:
            self.bar.update(1)
            postfix = {"loss": f"{m['loss']:.4f}", f"{self.unit}_s": f"{_tokens_per_s(m):.0f}",
                       "imb": f"{m['imbalance']:.2f}"}
            if m.get("consumed_tokens") is not None:
                postfix[self.unit] = format_count(m["consumed_tokens"])
            if m.get("bad_samples"):
                postfix["bad"] = m["bad_samples"]
            self.bar.set_postfix(postfix)
        elif step % self.interval == 0 or step == self.total:
            print("[megamoe] " + _line(step, self.total, m, self.unit), flush=True)

    def on_eval(self, step: int, val_loss: float, extra: dict | None = None) -> None:
        more = "".join(f", {k} {v:.4f}" for k, v in (extra or {}).items())
        self._print(f"[megamoe] step {step}: validation loss {val_loss:.4f}{more}")

    def on_final_save(self, step: int, root: str) -> None:
        self._print(f"[megamoe] saving final checkpoint step {step} to {root}")

    def on_end(self, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print("[megamoe] " + closing_line(summary, self.clock() - self.started), flush=True)


def json_text(record, **kwargs) -> str:
    """Strict JSON (no bare NaN or Infinity, which JSON readers reject): a non-finite number
    becomes null."""
    return json.dumps(_finite(record), allow_nan=False, **kwargs)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class TensorBoardCallback(Callback):
    """Scalars and histograms under `log_dir`; with `purge_step` (a resume continues at that
    step) TensorBoard hides the earlier events of the steps that are re-done."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def on_step(self, step: int, m: dict) -> None:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_avg",
                    "step_time_ms", "imbalance", "mfu", "z_loss"):
            if m.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", m[key], step)
        for key, value in m.items():
            if key.startswith("router/") or key.endswith(("load_balancing_loss", "/z_loss")):
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
            elif key.startswith("mor/") and key != "mor/depth":
                self.writer.add_scalar(key, value, step)
        if m.get("mor/depth") is not None:
            self._depth_histogram(m["mor/depth"], step)
        for layer, load in m.get("expert_load", {}).items():   # N, or "<stream>_layer<N>"
            name = f"layer{layer}" if isinstance(layer, int) else layer
            self.writer.add_histogram(f"experts/load_{name}", load, step)

    def _depth_histogram(self, counts: list[int], step: int) -> None:
        """`mor/depth`: tokens per recursion depth d = 0..N_r, one bucket per depth."""
        depths = [d for d, c in enumerate(counts) if c]
        if not depths:
            return
        num = sum(counts)
        self.writer.add_histogram_raw(
            "mor/depth", min=depths[0], max=depths[-1], num=num,
            sum=sum(d * c for d, c in enumerate(counts)),
            sum_squares=sum(d * d * c for d, c in enumerate(counts)),
            bucket_limits=[d + 0.5 for d in range(len(counts))], bucket_counts=counts,
            global_step=step)

    def on_eval(self, step: int, val_loss: float, extra: dict | None = None) -> None:
        self.writer.add_scalar("valid/loss", val_loss, step)
        for name, value in (extra or {}).items():
            self.writer.add_scalar(f"valid/{name}", value, step)

    def on_end(self, summary: dict) -> None:
        self.writer.flush()
        self.writer.close()


class JsonlCallback(Callback):
    """`metrics.jsonl` in the run directory: one JSON object per step and per validation.
    Records of steps after `keep_through` (the step a resume continues from) are dropped first,
    so each step appears once."""

    def __init__(self, path: str, keep_through: int = 0):
        self.path = path
        truncate_records(path, keep_through)
        self.file = open(path, "a", buffering=1)

    def _write(self, record: dict) -> None:
        try:
            self.file.write(json_text(record) + "\n")
        except OSError as exc:     # a failed write() names no file
            raise OSError(exc.errno, exc.strerror, self.path) from None

    def on_step(self, step: int, m: dict) -> None:
        self._write({"step": step, **{k: v for k, v in m.items() if k != "expert_load"},
                     "expert_load": {str(k): v.tolist() for k, v in m["expert_load"].items()}})

    def on_eval(self, step: int, val_loss: float, extra: dict | None = None) -> None:
        self._write({"step": step, "val_loss": val_loss,
                     **{f"val_{k}": v for k, v in (extra or {}).items()}})

    def on_end(self, summary: dict) -> None:
        self.file.close()


def truncate_records(path: str, keep_through: int) -> None:
    """Rewrite a JSON-lines file keeping the records of steps <= `keep_through` (and dropping
    a line torn by a crash); atomic, so a failure leaves the old file."""
    if not os.path.isfile(path):
        return
    kept, changed = [], False
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and record.get("step", 0) <= keep_through \
                    and line.endswith("\n"):
                kept.append(line)
            else:
                changed = True
    if not changed:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
