"""Device selection and the CPU bridge for Megatron-Core (see bridge.py)."""

from __future__ import annotations

import importlib.util

import torch


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_layout_supported(cfg, device_type: str | None = None) -> None:
    """Refuse layouts this device cannot run, naming the fields (before any process starts)."""
    device_type = device_type or default_device_type()
    if cfg.train.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("train.engine=deepspeed: the deepspeed package is not installed "
                         "(pip install -e '.[deepspeed]')")
    if device_type == "cpu" and cfg.train.precision == "bf16":
        raise ValueError("train.precision=bf16: CPU training runs in fp32 (use auto or fp32)")
