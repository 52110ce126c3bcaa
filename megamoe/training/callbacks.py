"""Trainer callbacks, active on rank 0: progress bar, one log line per interval, TensorBoard."""

from __future__ import annotations

import json
import math
import os
import sys


class Callback:
    def on_start(self, info: dict) -> None: ...
    def on_step(self, step: int, metrics: dict) -> None: ...
    def on_eval(self, step: int, val_loss: float) -> None: ...
    def on_end(self, summary: dict) -> None: ...


def _line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"grad {m['grad_norm']:.3f}", f"tok/s {m['tokens_per_s']:.0f}",
             f"imbalance {m['imbalance']:.2f}"]
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
    return " | ".join(parts)


class ProgressCallback(Callback):
    """A tqdm bar with loss and tokens/s when attached to a terminal; plain lines otherwise
    (every `log_interval` steps), so batch jobs get readable logs."""

    def __init__(self, total_steps: int, log_interval: int, enabled: bool = True):
        self.total, self.interval = total_steps, log_interval
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def on_start(self, info: dict) -> None:
        for key, value in info.items():
            print(f"[megamoe] {key}: {value}", flush=True)

    def on_step(self, step: int, m: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}",
                                 imb=f"{m['imbalance']:.2f}")
        elif step % self.interval == 0 or step == self.total:
            print("[megamoe] " + _line(step, self.total, m), flush=True)

    def on_eval(self, step: int, val_loss: float) -> None:
        msg = f"[megamoe] step {step}: validation loss {val_loss:.4f}"
        (self.bar.write if self.bar is not None else print)(msg)

    def on_end(self, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()


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
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "imbalance", "mfu", "z_loss"):
            if m.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", m[key], step)
        for key, value in m.items():
            if key.startswith("router/") or key.endswith("load_balancing_loss"):
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
            elif key.startswith("mor/") and key != "mor/depth":
                self.writer.add_scalar(key, value, step)
        if m.get("mor/depth") is not None:
            self._depth_histogram(m["mor/depth"], step)
        for layer, load in m.get("expert_load", {}).items():
            self.writer.add_histogram(f"experts/load_layer{layer}", load, step)

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

    def on_eval(self, step: int, val_loss: float) -> None:
        self.writer.add_scalar("valid/loss", val_loss, step)

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

    def on_eval(self, step: int, val_loss: float) -> None:
        self._write({"step": step, "val_loss": val_loss})

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
