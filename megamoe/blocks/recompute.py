"""Activation recompute that keeps each micro-batch's context.

Megatron's activation checkpointing (`tensor_parallel.checkpoint`) runs a function under
`no_grad` in the forward pass and runs it again in the backward pass to rebuild its graph. The
backward pass comes after the model's forward has returned — under pipeline schedules after
other micro-batches' forwards — so the context bound by the model's forward
(megamoe.blocks.context) is gone, or is another micro-batch's, when the function re-runs.
`checkpoint_in_context` captures the context bound when the checkpointed function is built and
binds it again around the re-run; `ContextTransformerBlock` is Megatron's `TransformerBlock` with
its full-recompute path built on it (no Megatron code is patched).

Per-step counters and statistics are recorded by the pass that builds the autograd graph
(`training and torch.is_grad_enabled()`): with recompute that is the re-run, so each micro-batch
counts once.
"""

from __future__ import annotations

from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock

from megamoe.blocks.context import bind, bound_context


def checkpoint_in_context(function, distribute_saved_activations: bool, *args):
    """Megatron's `tensor_parallel.checkpoint(function, ...)`, where both runs of `function`
    (forward, and the recompute in backward) see the context bound now."""
    context = bound_context()

    def run_in_context(*inputs):
        with bind(context):
            return function(*inputs)

    return tensor_parallel.checkpoint(run_in_context, distribute_saved_activations, *args)


class ContextTransformerBlock(TransformerBlock):
    """Megatron's TransformerBlock whose full recompute (`recompute_granularity: full`, methods
    `uniform` and `block` as in Megatron) re-runs its layers in their micro-batch's context."""

    def _checkpointed_forward(self, hidden_states, attention_mask, context, context_mask,
                              rotary_pos_emb, attention_bias, packed_seq_params,
                              use_inner_quantization_context, padding_mask=None):
        # `context` here is Megatron's cross-attention input, not megamoe's Context
        assert not (self.config.fp8 or self.config.fp4), "megamoe sets no Megatron FP8 recipe"

        def layers(start: int, end: int):
            def run(hidden_states, attention_mask, context, context_mask, rotary_pos_emb,
                    padding_mask):
                for index in range(start, end):
                    hidden_states, context = self._get_layer(index)(
                        hidden_states=hidden_states, attention_mask=attention_mask,
                        context=context, context_mask=context_mask,
                        rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
                        inference_context=None, packed_seq_params=packed_seq_params,
                        padding_mask=padding_mask)
                return hidden_states, context
            return run

        n, k = self.num_layers_per_pipeline_rank, self.config.recompute_num_layers
        uniform = self.config.recompute_method == "uniform"
        assert uniform or self.config.recompute_method == "block", self.config.recompute_method
        for start in range(0, n, k if uniform else 1):
            run = layers(start, min(start + k, n) if uniform else start + 1)
            args = (hidden_states, attention_mask, context, context_mask, rotary_pos_emb,
                    padding_mask)
            if uniform or start < k:        # `block`: the first k layers of this stage
                hidden_states, context = checkpoint_in_context(
                    run, self.config.distribute_saved_activations, *args)
            else:
                hidden_states, context = run(*args)
        return hidden_states
