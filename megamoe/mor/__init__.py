"""Mixture-of-Recursions (Bae et al., arXiv 2507.10524; papers.md §1) on Megatron-Core.

What exists (increment 1: the block, one process; increment 2: in the LM, DP and EP;
increment 3: TP + SP; increment 4: PP):
- `sharing.py`      Cycle / Sequence / Middle-Cycle (default) / Middle-Sequence maps, §1.2;
                    `SharingPlan.recursion_steps()` gives the pool slots of each recursion step.
- `expert_choice.py` one linear router per step, α·σ(z), C_r = (N_r−r+1)/N_r, hierarchical
                    filtering, sorted top-k, BCE aux loss (coeff 0.001), σ > 0.5 at inference.
- `token_choice.py` Linear D→N_r on H^1, softmax·α, top-1 depth, balancing loss (0.1), z-loss
                    (coeff configurable: 1e-5 code vs 1e-3 paper), loss-free bias (u = 0.001).
- `compaction.py`   gather the active tokens per sequence (padded; K ≥ 1 so that a step keeping
                    nothing still runs on every rank), causal mask among them, RoPE at original
                    positions, [K, S] mask for KV sharing, scatter back.
- `attention.py`    `MoRSelfAttention` (Megatron `SelfAttention` + a per-call KV context):
                    stores / reuses first-recursion K/V; `RecursionKVCache` measures KV memory.
- `block.py`        `RecursionBlock`: shared `TransformerLayer`s built from megamoe's decoder
                    layer spec (MoE FFNs allowed) applied N_r times on compacted batches.
                    TP + SP (`sp_group`): input/output are SP shards [S/TP, B, D]; the block
                    all-gathers the sequence, routes and compacts it identically on every TP
                    rank, pads K to a multiple of TP (`Compaction.padded`: index 0, masked as
                    keys, dropped from the output), scatters the compact batch into SP shards
                    for the shared layers, gathers their output, scatters the result back.
                    Gathers use `tensor_parallel_output_grad=False` (backward keeps this rank's
                    slice, since what follows is replicated over TP); router weights are not
                    `sequence_parallel` (each TP rank holds the full, identical gradient).
- `decoder.py`      `MoRDecoder`, the `TransformerBlock` that `models.lm.build_lm` puts into
                    GPTModel when `model.mor.enabled`: unique first layer → RecursionBlock →
                    unique last layer → final norm (Cycle/Sequence: block + norm), GPTModel's
                    rotary table passed through; the depth-router loss attached with Megatron's
                    `MoEAuxLossAutoScaler`, × S·B per micro-batch (S the full sequence, also
                    under SP) as MoE aux losses under
                    `calculate_per_token_loss`; non-homogeneous checkpoint keys
                    (`decoder.layers.{0,1}`, `decoder.recursion.layers.{j}`,
                    `decoder.recursion.router.*`), initialised by global key (models.init);
                    `mor_after_step` (called by `training.engine.optimizer_step`): token-choice
                    loss-free bias from depth ratios all-reduced over DP.
                    PP: each stage's decoder holds its stage's units (`units`; `recursion`
                    None off the block's stage, where `mor_decoders` skips it), reads the
                    previous stage's [S(/TP), B, D] from `input_tensor`; pool layer numbers
                    stay slot + 1 on every stage (Megatron's stage offset subtracted).
- `stages.py`       pipeline stages: units [first unique layer, recursion block, last unique
                    layer] (Cycle/Sequence: the block), contiguous, ≥ 1 per stage, the block
                    never split (its steps share weights); the split minimises the largest
                    stage's training FLOPs per token (`accounting.mor_flops_by_unit`: step r
                    ∝ k_r + k_r²; output layer on the last stage, the embedding lookup free).
- `accounting.py`   parameters (pool counted once) and FLOPs per token with the capacities
                    (token-choice: perfect balance), used by `training.metrics`; per
                    pipeline unit for `stages.py`.
- Config: `megamoe/config/mor.py` (`model.mor`, off by default; validated; refuses
  PP > units (`parallel.pipeline` ≤ 3, Cycle/Sequence 1), virtual PP, non-`topk` MoE
  routers, synthetic routing context, MoE/dense disagreement within a pool slot, and expert-choice without `model.mor.allow_non_causal`, MoR's own opt-in).
  TP > 1 with MoE layers in the shared pool only when no TP pad can appear: expert-choice with
  every k_r divisible by TP (else `model.mor.capacities`), token-choice refused
  (`parallel.tensor`) — shared MoE routers do not take pads as padding yet (next, 3).
  Recipes `configs/mor_expert.yaml`, `configs/mor_token.yaml` (EP2, MoE in every layer).
- Tests: tests/unit/mor (config, decoder aux-loss scale, empty step, accounting),
  tests/distributed/test_mor_parity.py (DP2, EP2, TP2+SP (dense, k = 16, 10, 5) × expert/
  token, EP2×TP2 expert-choice (k = 16, 8, 4), PP2 × expert/token, PP2 with the block on
  the last stage, PP3, PP2×EP2, PP2×TP2+SP, negative controls on a shared pool weight on the
  block's stage), test_mor_pp.py (stage contents, keys, layer numbers, PP2 initialisation),
  tests/unit/mor/test_mor_stages.py (hand-computed stage FLOPs), test_checkpoint_reshard.py
  (MoR PP2 ↔ PP1), test_mor_checkpoint.py (save/load of every parameter and buffer),
  test_mor_train.py (30 steps of both recipes: loss falls, stays above the entropy rate).

Next increments:
1. PP beyond three stages: several recursion blocks per model (more units), or a block's
   steps over stages with the pool's gradients reduced across them like tied embeddings
   (and the step's token selection sent along); the interleaved schedule (virtual stages).
2. Routing context inside the block: gather per-token fields (modality ids) with the same
   `Compaction` before shared MoE layers see the compacted batch, and hand pads to the MoE
   router as `padding_mask` (Megatron 0.16's `TopKRouter.routing` accepts one, megamoe's
   `MegamoeMoELayer.route` / `TopKRouter.routing` drop it today; pads of token-choice, the
   one-pad steps and TP pads count in the shared MoE layers' aux/z losses, capacity and
   loss-free counts). Then lift `config/mor.py::_check_tp_pads` (token-choice + MoE + TP,
   k_r that TP does not divide) and admit the other MoE router families.
3. TP without the recompute: the block replicates routing, compaction and the residual update
   over TP ranks (O(S·B·D) per rank, small next to the layers); a sharded residual update
   would need the compact positions per SP shard.
4. Logging: MoR statistics (kept fraction per step, depth histogram, sampling accuracy, dead
   tokens) into the trainer's metrics like `training.metrics.routing_stats` (today only
   `RecursionBlock.last_stats` holds them); the causality log line for expert-choice.
5. DP distributed optimizer: routers and the pool are ordinary parameters; add a parity case.
6. Inference: continuous depth-wise batching (§1.7) on top of `RecursionKVCache`; HF export.
"""

# block.py / attention.py import Megatron: import them from their modules
from megamoe.mor.expert_choice import ExpertChoiceDepthRouter, capacity_schedule, tokens_kept
from megamoe.mor.sharing import SharingPlan, sharing_plan
from megamoe.mor.token_choice import TokenChoiceDepthRouter

__all__ = ["ExpertChoiceDepthRouter", "SharingPlan", "TokenChoiceDepthRouter",
           "capacity_schedule", "sharing_plan", "tokens_kept"]
