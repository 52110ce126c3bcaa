"""A stand-in for the `torch` name inside selected Megatron-Core modules when running on CPU.

Megatron-Core 0.16 calls `torch.cuda.current_device()`, `torch.cuda.Stream()` and passes
`device="cuda"` to tensor factories in many places. Instead of patching torch for the whole
process, the bridge rebinds the module-level name `torch` of each listed Megatron module to a
`CpuTorch` proxy: every attribute is torch's own, except `torch.cuda` (a CPU stand-in) and the
tensor factories, which map a CUDA device argument to the CPU. Code outside those modules is
untouched.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor", "randperm",
)


def _cpu_device(device):
    """Map a CUDA device spec (`"cuda"`, `"cuda:0"`, an int, a torch.device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


class _NullStream:
    """A CUDA stream on the CPU: work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Nvtx:
    @staticmethod
    def range_push(msg):
        pass

    @staticmethod
    def range_pop():
        pass

    @staticmethod
    @contextlib.contextmanager
    def range(msg, *args, **kwargs):
        yield


class CpuCuda(types.SimpleNamespace):
    """`torch.cuda` as Megatron sees it on a CPU rank."""

    Stream = _NullStream
    Event = _NullEvent
    nvtx = _Nvtx
    FloatTensor = torch.FloatTensor
    HalfTensor = torch.HalfTensor
    BFloat16Tensor = torch.BFloat16Tensor

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def current_stream(device=None):
        return _NullStream()

    @staticmethod
    def default_stream(device=None):
        return _NullStream()

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def memory_allocated(device=None):
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def is_current_stream_capturing():
        return False

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class CpuTorch(types.ModuleType):
    """The `torch` module with `cuda` replaced and CUDA factory devices mapped to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = CpuTorch()
