"""Seeding of torch and Megatron's model-parallel RNG tracker (dropout inside TP regions)."""

from __future__ import annotations


def seed_rng(seed: int) -> None:
    """Seed torch and the tracker; the tracker offsets TP ranks from the "lm" grid's state."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
