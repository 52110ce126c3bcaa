"""Expert back ends: Megatron's `SequentialMLP` (a loop over local experts) and megamoe's
`GroupedExperts` (one grouped GEMM per projection); both hold the same parameters."""

from megatron.core.transformer.moe.experts import SequentialMLP

from megamoe.moe.experts.grouped import GroupedExperts

EXPERT_MODULES = {"sequential": SequentialMLP, "grouped": GroupedExperts}

__all__ = ["EXPERT_MODULES", "GroupedExperts"]
