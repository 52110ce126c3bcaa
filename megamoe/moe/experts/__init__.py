"""Expert back ends: Megatron's `SequentialMLP` (a loop over local experts), megamoe's
`GroupedExperts` (one grouped GEMM per projection), both holding the same parameters, and
`FP8Experts` (either one's parameters, expert GEMMs in FP8; `model.moe.fp8`)."""

from megatron.core.transformer.moe.experts import SequentialMLP

from megamoe.moe.experts.fp8 import FP8Experts
from megamoe.moe.experts.grouped import GroupedExperts

EXPERT_MODULES = {"sequential": SequentialMLP, "grouped": GroupedExperts}

__all__ = ["EXPERT_MODULES", "FP8Experts", "GroupedExperts"]
