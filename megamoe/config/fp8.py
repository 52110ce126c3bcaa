"""`model.moe.fp8`: FP8 expert GEMMs (megamoe.fp8). Router, softmax and losses stay fp32 and
master weights stay in high precision whatever is chosen here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megamoe.config.errors import at_least, fail, one_of

FP8_RECIPES = ("none", "tensorwise", "delayed", "rowwise", "blockwise")
FP8_GRAD_FORMATS = ("auto", "e4m3", "e5m2")
# scaled_mm: one torch._scaled_mm per expert (any device); scaled_grouped_mm: one
# torch._scaled_grouped_mm per projection (CUDA, rowwise); te: Transformer Engine (probe only)
FP8_BACKENDS = ("auto", "scaled_mm", "scaled_grouped_mm", "te")


@dataclass
class FP8Options:
    SECTION: ClassVar[str] = "model.moe.fp8"

    recipe: str = "none"             # none | tensorwise | delayed | rowwise | blockwise
    grad_format: str = "auto"        # auto: e5m2 for tensorwise/delayed, e4m3 otherwise
    amax_history_len: int = 16       # delayed: scales come from the max of this many amaxes
    margin: int = 0                  # scale = amax / fmax · 2^margin (headroom)
    backend: str = "auto"            # auto | scaled_mm | scaled_grouped_mm | te
    row_multiple: int = 0            # rows per expert padded to this in the routing map; 0: the
                                     # back end's (scaled_mm 1, scaled_grouped_mm 16)
    keep_high_precision_layers: list[int] = field(default_factory=list)  # layer indices kept
                                     # out of FP8; negative counts from the end ([0, -1])

    def validate(self) -> None:
        one_of(self, "recipe", FP8_RECIPES)
        one_of(self, "grad_format", FP8_GRAD_FORMATS)
        one_of(self, "backend", FP8_BACKENDS)
        at_least(self, "amax_history_len", 1)
        at_least(self, "margin", 0)
        if self.row_multiple not in (0, 1, 16):
            fail("model.moe.fp8.row_multiple", "must be 0 (the back end's), 1 (no padding) or 16 "
                 f"(Megatron's routing-map padding for quantisation), got {self.row_multiple}")

    def in_use(self, moe) -> bool:
        return True

    def validate_with(self, moe) -> None:
        if self.recipe == "none":
            return
        if moe.num_experts == 0:
            fail("model.moe.fp8.recipe", "needs MoE experts (model.moe.num_experts > 0)")
        if self.backend == "scaled_grouped_mm" and self.recipe != "rowwise":
            fail("model.moe.fp8.backend", "scaled_grouped_mm runs the rowwise recipe only, "
                 f"got model.moe.fp8.recipe={self.recipe}")
        if self.backend == "scaled_grouped_mm" and self.grad_format == "e5m2":
            fail("model.moe.fp8.grad_format", "scaled_grouped_mm takes E4M3 operands only")
        if self.row_multiple > 1 and moe.token_dispatcher != "alltoall":
            fail("model.moe.fp8.row_multiple", "padding the routing map needs "
                 "model.moe.token_dispatcher=alltoall (Megatron's allgather dispatcher has none)")

    def keeps(self, layer: int, num_layers: int) -> bool:
        """Whether 0-based layer `layer` stays in high precision."""
        return any(layer == (k if k >= 0 else num_layers + k)
                   for k in self.keep_high_precision_layers)


def check_fp8_layout(cfg) -> None:
    """Blockwise FP8 under expert tensor parallelism: each expert-TP shard must hold whole
    128-wide tiles of the split FFN dimension (fc2's K, fc1's output rows, gate and up alike),
    so that each shard's tiles and 128×128 weight blocks are one process's. Otherwise a tile
    would straddle two ranks and need their amaxes combined per tile, which is not built."""
    fp8, etp = cfg.model.moe.fp8, cfg.parallel.expert_tensor_size
    if fp8.recipe != "blockwise" or etp == 1 or cfg.model.moe.num_experts == 0:
        return
    F = cfg.model.moe.ffn_hidden_size
    if (F // etp) % 128:
        fail("model.moe.ffn_hidden_size", f"{F} / parallel.expert_tensor ({etp}) = {F // etp} "
             "is not a multiple of 128, which model.moe.fp8.recipe=blockwise needs under expert "
             "tensor parallelism (each shard holds whole 1×128 tiles); use rowwise, or a "
             f"multiple of {128 * etp}")
