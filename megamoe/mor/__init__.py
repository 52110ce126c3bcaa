"""Mixture-of-Recursions (Bae et al., arXiv 2507.10524; papers.md §1) on Megatron-Core.

What exists (increment 1: one process, correctness first):
- `sharing.py`      Cycle / Sequence / Middle-Cycle (default) / Middle-Sequence maps, §1.2;
                    `SharingPlan.recursion_steps()` gives the pool slots of each recursion step.
- `expert_choice.py` one linear router per step, α·σ(z), C_r = (N_r−r+1)/N_r, hierarchical
                    filtering, sorted top-k, BCE aux loss (coeff 0.001), σ > 0.5 at inference.
- `token_choice.py` Linear D→N_r on H^1, softmax·α, top-1 depth, balancing loss (0.1), z-loss
                    (coeff configurable: 1e-5 code vs 1e-3 paper), loss-free bias (u = 0.001).
- `compaction.py`   gather the active tokens per sequence (padded), causal mask among them,
                    RoPE at original positions, [K, S] mask for KV sharing, scatter back.
- `attention.py`    `MoRSelfAttention` (Megatron `SelfAttention` + a per-call KV context):
                    stores / reuses first-recursion K/V; `RecursionKVCache` measures KV memory.
- `block.py`        `RecursionBlock`: shared `TransformerLayer`s built from megamoe's decoder
                    layer spec (MoE FFNs allowed) applied N_r times on compacted batches.

How the next increments plug in:
1. Config: a `model.mor` section (validated next to its dataclass in megamoe.config):
   `enabled, num_recursions, sharing (middle_cycle), router (expert|token), capacities,
   alpha, temperature, aux_loss_coeff, z_loss_coeff, inference_rule, gating, kv_sharing,
   token.{score, balancing, balance_coeff, bias_rate}`. ValueErrors here already name those
   fields. `num_layers` is the unrolled L; `sharing.base_depth` refuses an L that does not split.
2. Spec/model: a `decoder_block_spec` variant builds only the unique layers (first/last for
   Middle-*) as ordinary layers and the shared pool once (`build_shared_layers`, pool slot + 1
   as layer_number); a `TransformerBlock` subclass (or a GPTModel decoder replacement) runs
   first layer → `RecursionBlock` → last layer → final norm, passing GPTModel's
   `rotary_pos_emb` ([S,1,1,d]) through. The aux loss (`block.last_aux_loss`) joins the LM loss
   with Megatron's `MoEAuxLossAutoScaler` (as MoE aux losses do), scaled per token like
   `calculate_per_token_loss`. `TokenChoiceDepthRouter.update_bias()` runs after each optimiser
   step (all-reduce `ratio_sum`/`ratio_count` over DP first), like the loss-free MoE bias.
   Routing context fields per token (modality ids) must be gathered with the same `Compaction`
   before MoE layers inside the block see the compacted batch; pads should reach the MoE
   router as `padding_mask` (megamoe's MoE layer does not read it yet: pads of token-choice
   currently count in the MoE aux loss of shared MoE layers).
3. TP + SP: under sequence parallelism the hidden states are S/TP per rank; route and compact
   on the gathered sequence (all-gather over TP, as `moe.routers.sp_gather` does), pad every
   compacted length K to a multiple of TP (extra pads, masked like the others) and scatter
   back to the SP shard. Expert-choice top-k is per sequence, so all TP ranks agree.
4. EP: nothing MoR-specific; shared MoE layers dispatch the compacted tokens as usual (the
   number of tokens differs per step: the dispatcher already handles variable counts).
5. PP: the recursion block should live on one stage at first (shared weights across stages
   would need tied-gradient reduction like shared embeddings); stage balancing then counts
   FLOPs, not layers: step r costs ∝ k_r (linear) + k_r² (attention), papers.md §1.8.
6. DP / distributed optimizer: routers and the pool are ordinary parameters; `router_bias` is
   a persistent buffer (checkpointed, identical on all DP ranks after the reduced update).
7. Parity tests (tests/distributed): TP2+SP, EP2, PP2, DP2 against one process with the
   tolerances of DESIGN.md, a negative control per test, and the causality probe for
   `model.mor.router=expert` (non-causal in training: refuse without `allow_non_causal`).
8. Inference: continuous depth-wise batching (§1.7) on top of `RecursionKVCache`.
"""

# block.py / attention.py import Megatron: import them from their modules
from megamoe.mor.expert_choice import ExpertChoiceDepthRouter, capacity_schedule, tokens_kept
from megamoe.mor.sharing import SharingPlan, sharing_plan
from megamoe.mor.token_choice import TokenChoiceDepthRouter

__all__ = ["ExpertChoiceDepthRouter", "SharingPlan", "TokenChoiceDepthRouter",
           "capacity_schedule", "sharing_plan", "tokens_kept"]
