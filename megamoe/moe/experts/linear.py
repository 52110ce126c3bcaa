"""The experts' output projection: Megatron's `RowParallelLinear` with two fixes for expert
biases (ViT and DiT experts have them; megamoe's LM experts do not, and are unchanged).

Megatron's expert MLP adds its fc2 bias in place (`output += bias · prob`, MLP.forward with a
per-token scale). When the expert's tensor-parallel group has one rank, RowParallelLinear's
reduction returns its input as-is from inside an autograd Function, and autograd refuses an
in-place change of such a view. Experts without biases never add; with biases (ViT and DiT
experts) the output is cloned first — one [T, D] copy per expert call, small next to the GEMMs.

RowParallelLinear also marks its bias `sequence_parallel` under SP, so `finalize_model_grads`
sums its gradient over the TP group, as is right for a dense layer whose TP ranks each saw a
slice of the sequence. An expert sees the tokens dispatched to it from every rank, and its
gradient is reduced over the expert-data-parallel group (which holds the TP ranks when
expert-TP is smaller); the extra TP sum counted it twice (expert fc2 bias gradients off by up to
40% in the vit family's TP2+SP+EP2 parity test). The mark is removed.
"""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import RowParallelLinear


class ExpertRowParallelLinear(RowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            self.bias.sequence_parallel = False
            # Counted once per expert-TP group in the gradient norm. Megatron counts an
            # unmarked parameter on rank 0 of the optimizer's TP group; for experts that is the
            # dense TP group, so with expert-TP 1 < TP the bias (replicated on the TP ranks,
            # each holding other experts' replicas) was counted on TP rank 0 only: the norm
            # missed half of it in TP2+SP+EP2 and clipping scaled the step wrongly.
            from megatron.core.utils import get_pg_rank

            self.bias.tensor_model_parallel = get_pg_rank(self.tp_group) == 0

    def forward(self, input_):
        output, output_bias = super().forward(input_)
        if output_bias is not None:
            output = output.clone()
        return output, output_bias
