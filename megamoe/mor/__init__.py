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
                    Every pad of a compact batch (ragged token-choice rows, the one pad of an
                    empty step, TP pads) goes to the shared layers as Megatron's `padding_mask`
                    (this rank's SP slice): their top-k MoE routers route pads to no expert
                    and leave them out of aux/z losses, capacity and loss-free counts
                    (megamoe.moe.routers.topk), so pads change no loss or gradient. The
                    per-token routing context (modality ids) is gathered with the same
                    compaction for the step's layers (`Context.compacted`).
                    Gathers use `tensor_parallel_output_grad=False` (backward keeps this rank's
                    slice, since what follows is replicated over TP); router weights are not
                    `sequence_parallel` (each TP rank holds the full, identical gradient).
- `decoder.py`      `MoRDecoder`, the `TransformerBlock` that `models.lm.model.build_lm` puts into
                    GPTModel when `model.mor.enabled`: unique first layer → RecursionBlock →
                    unique last layer → final norm (Cycle/Sequence: block + norm), GPTModel's
                    rotary table passed through; the depth-router loss attached with Megatron's
                    `MoEAuxLossAutoScaler`, × S·B per micro-batch (S the full sequence, also
                    under SP) as MoE aux losses under
                    `calculate_per_token_loss`; non-homogeneous checkpoint keys
                    (`decoder.layers.{0,1}`, `decoder.recursion.layers.{j}`,
                    `decoder.recursion.router.*`), initialised by global key (models.init);
                    `mor_after_step` (called by `engines.megatron.MegatronEngine.after_step`): token-choice
                    loss-free bias from depth ratios all-reduced over DP.
                    PP: each stage's decoder holds its stage's units (`units`; `recursion`
                    None off the block's stage, where `mor_decoders` skips it), reads the
                    previous stage's [S(/TP), B, D] from `input_tensor`; pool layer numbers
                    stay slot + 1 on every stage (Megatron's stage offset subtracted).
- `generate.py`     `MoRGenerator`: cached generation (one process, eval mode): per-position
                    work items (embed + first layer → recursion steps until the token exits →
                    last layer + head), one KV cache per layer application (recursion-wise:
                    (r, j) holds the tokens active at step r; KV sharing: (0, j) read at r > 0),
                    continuous depth-wise batching (`policy="depth"`: exits free their slot for
                    queued tokens; "sequence" is the baseline). Reproduces the eval forward's
                    logits (tests/unit/mor/test_mor_generate.py); `tools/bench_mor.py` prints
                    tokens/s of both policies. `megamoe.commands.generate`: `megamoe generate`.
- `stages.py`       pipeline stages: units [first unique layer, recursion block, last unique
                    layer] (Cycle/Sequence: the block), contiguous, ≥ 1 per stage, the block
                    never split (its steps share weights); the split minimises the largest
                    stage's training FLOPs per token (`accounting.mor_flops_by_unit`: step r
                    ∝ k_r + k_r²; output layer on the last stage, the embedding lookup free).
- `accounting.py`   parameters (pool counted once) and FLOPs per token with the capacities
                    (token-choice: perfect balance), used by `models.accounting`; per
                    pipeline unit for `stages.py`.
- `lora.py`         Relaxed Recursive Transformers (papers.md §2; `model.mor.lora_rank` > 0):
                    one LoRA per unrolled position (step r, layer j of the step) and target
                    linear (`qkv` fused q/k/v — the reference adapts q and v only — `proj`,
                    dense `fc1`/`fc2`), W x + (α/R)·B A x. Forward hooks on Megatron's column /
                    row-parallel linears add the adapter that `RecursionBlock.run_step` selects
                    before each layer call. TP + SP: the rank-R activation A x is gathered
                    (column) or reduce-scattered (row) over the sequence; the replicated factor
                    is marked `sequence_parallel` so that `finalize_model_grads` sums its
                    gradient over TP. Keys `decoder.recursion.lora.{r}.{j}.{target}.{A,B}`
                    (fc1's B split into SwiGLU halves like the weight); `models.init`: B = 0,
                    A ~ N(0, 1/d_in), so the model at init is the unrelaxed one. Unique
                    layers get none; MoE expert FFNs are refused (`model.mor.lora_targets`).
                    Cached generation selects adapters per batch row (`select_rows`).
- Config: `megamoe/config/mor.py` (`model.mor`, off by default; its fields validated at
  load). `checks.py` (run by `models.checks.check_config`) refuses PP > units
  (`parallel.pipeline` ≤ 3, Cycle/Sequence 1), virtual PP, MoE routers other than `topk` and
  `modality` (VLMo without VL layers, Uni-MoE pools), synthetic timesteps, MoE/dense
  disagreement within a pool slot, and expert-choice without `model.mor.allow_non_causal`,
  MoR's own opt-in. TP > 1 with MoE layers in the shared pool
  is allowed for both depth routers and any k_r (the pads are masked in the MoE routers).
  Recipes `configs/mor_expert.yaml`, `configs/mor_token.yaml` (EP2, MoE in every layer).
- Tests: tests/unit/mor (config, decoder aux-loss scale, empty step, accounting, modality
  ids following the compaction), tests/unit/routers/test_topk_padding.py (an MoE layer with
  pads = without them), tests/distributed/test_mor_parity.py (DP2, EP2, TP2+SP (dense,
  k = 16, 10, 5) × expert/token, EP2×TP2 with MoE in the pool: expert-choice k = 16, 8, 4 and
  16, 10, 5, token-choice with top-k and with Uni-MoE modality pools; DP2 distributed
  optimizer; negative controls on a shared pool weight, and unmasked pads breaking EP2×TP2;
  PP2 × expert/token, PP2 with the block on the last stage, PP3, PP2×EP2, PP2×TP2+SP,
  with the negative control on the block's stage), test_mor_pp.py (stage contents, keys, layer
  numbers, PP2 initialisation), tests/unit/mor/test_mor_stages.py (hand-computed stage FLOPs),
  test_checkpoint_reshard.py (MoR PP2 ↔ PP1), test_mor_checkpoint.py (save/load of every
  parameter and buffer), LoRA: tests/unit/mor/test_mor_lora_adapters.py (adapter math, init = unrelaxed model, one
  adapter per step, accounting), tests/distributed/test_mor_lora.py (TP2 ± SP / EP2 parity
  with B ≠ 0, negative controls, checkpoint, training),
  test_mor_train.py (30 steps of both recipes: loss falls, stays above the entropy rate).

Next increments:
1. PP beyond three stages: several recursion blocks per model (more units), or a block's
   steps over stages with the pool's gradients reduced across them like tied embeddings
   (and the step's token selection sent along); the interleaved schedule (virtual stages).
2. More MoE families in the pool: each needs `takes_padding_mask` (pads routed nowhere, out of
   its losses; today `topk`, its subclass `dit_moe` (not admitted by config), and `modality`)
   and, for context beyond per-token fields, a rule to compact it (per-sample timesteps pass
   through unchanged, but the timestep families do not take pads yet); VLMo's VL layers ("the
   top layers") have no meaning for a pool slot applied at several depths.
3. TP without the recompute: the block replicates routing, compaction and the residual update
   over TP ranks (O(S·B·D) per rank, small next to the layers); a sharded residual update
   would need the compact positions per SP shard.
4. (done: kept share per step, depth histogram and sampling accuracy in metrics.jsonl and
   TensorBoard, `mor.metrics.MoRDepthStats`.)
5. (done: DP2 distributed-optimizer parity case; routers and the pool are ordinary parameters.)
6. Inference: generation under TP/EP (the batch of a step differs per rank: collectives in
   shared MoE layers need matched calls), static-shape caches for CUDA graphs.
   HF export is done: `megamoe convert --to hf` writes the remote code's recursion block
   (megamoe/checkpoint/hf_remote/mor_megamoe.py, masks instead of compaction; hf_mor.py maps
   `model.mor`), `--from hf` imports it back (tests/unit/test_hf_mor.py). The HF model has no
   KV cache yet (generation recomputes the prefix).
7. LoRA relaxation (lora.py): the RRT SVD initialisation from a pretrained model's residuals
   (uptraining; needs an import path for unshared weights), LoRA on MoE experts, and the
   per-module rank pattern (`rank_pattern`) of the reference code. Dropout on the adapter input
   exists (`lora_dropout`) but its masks depend on the TP/SP layout (parity only at 0).
"""

# block.py / attention.py import Megatron: import them from their modules
from megamoe.mor.expert_choice import ExpertChoiceDepthRouter, capacity_schedule, tokens_kept
from megamoe.mor.sharing import SharingPlan, sharing_plan
from megamoe.mor.token_choice import TokenChoiceDepthRouter

__all__ = ["ExpertChoiceDepthRouter", "SharingPlan", "TokenChoiceDepthRouter",
           "capacity_schedule", "sharing_plan", "tokens_kept"]
