"""GEMM back ends of FP8 experts, chosen automatically and overridable
(`model.moe.fp8.backend`):

  scaled_mm          one `torch._scaled_mm` per expert and GEMM (CPU and GPU; every recipe;
                     rows aligned to 16 on CUDA, none needed on CPU)
  scaled_grouped_mm  one `torch._scaled_grouped_mm` per projection (CUDA only, rowwise scales;
                     token groups aligned to 16 rows in the routing map)
  te                 Transformer Engine: a capability probe and this integration point only.
                     TE cannot be installed here nor on the lent GPU machines, so there is no
                     untested TE path: selecting it raises one clear error.

`auto` picks scaled_grouped_mm for rowwise grouped experts on CUDA without expert tensor
parallelism, scaled_mm otherwise. Under expert-TP only scaled_mm: its whole-row scales of split
contractions (megamoe.fp8.linear) are proven by parity on CPU; the grouped kernel's path has no
multi-GPU test, so it is refused there rather than left untested.
"""

from __future__ import annotations

import importlib.util

GROUPED_ROW_MULTIPLE = 16     # CUDA FP8 GEMMs: contractions (and groups) multiples of 16


def te_available() -> bool:
    """Capability probe: is Transformer Engine's PyTorch package importable?"""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(backend: str, recipe: str, grouped: bool, cuda: bool,
                    grad_format: str = "auto", expert_tp: int = 1) -> str:
    """The back end `model.moe.fp8.backend` means for this recipe, expert module, device and
    expert-TP size."""
    if backend == "te":
        why = ("is not installed" if not te_available() else
               "is installed but megamoe has no tested TE expert path yet (integration point: "
               "megamoe.fp8.backends.resolve_backend)")
        raise ValueError(f"model.moe.fp8.backend: te needs Transformer Engine, which {why}; "
                         "use auto, scaled_mm or scaled_grouped_mm")
    if backend == "auto":
        fits = (cuda and grouped and recipe == "rowwise" and grad_format != "e5m2"
                and expert_tp == 1)
        return "scaled_grouped_mm" if fits else "scaled_mm"
    if backend == "scaled_grouped_mm" and expert_tp > 1:
        raise ValueError(f"model.moe.fp8.backend: scaled_grouped_mm with expert tensor "
                         f"parallelism ({expert_tp}) is not supported; use auto or scaled_mm")
    if backend == "scaled_grouped_mm" and not cuda:
        raise ValueError("model.moe.fp8.backend: scaled_grouped_mm needs CUDA "
                         "(torch._scaled_grouped_mm has no CPU kernel); use scaled_mm")
    return backend


def row_multiple(opts, grouped: bool, cuda: bool) -> int:
    """Rows per expert group the routing map is padded to (`model.moe.fp8.row_multiple`; 0:
    16 on CUDA, whose FP8 kernels need every contraction a multiple of 16 — the weight
    gradient contracts each expert's tokens — and 1 on CPU, whose `_scaled_mm` takes any
    size)."""
    if opts.recipe == "none":
        return 1
    if opts.row_multiple:
        return opts.row_multiple
    resolve_backend(opts.backend, opts.recipe, grouped, cuda, opts.grad_format)   # errors first
    return GROUPED_ROW_MULTIPLE if cuda else 1
