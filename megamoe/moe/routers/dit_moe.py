"""DiT-MoE gate (Fei et al., "Scaling Diffusion Transformers to 16 Billion Parameters",
arXiv 2407.11633, §3.2 and Eq. 5; code `feizc/DiT-MoE` `MoEGate`; papers.md §6).

- s = softmax(x Wᵀ); the k = 2 largest s_e are the combine weights, *not* renormalised
  (`norm_topk_prob=False`): y = Σ_topk s_e·E_e(x) + Shared(x).
- Expert-level balance loss, Eq. 5: L = α Σ_i f_i P_i with f_i = n/(K·T)·count_i and
  P_i = mean_t s_{t,i}, over the micro-batch (`seq_aux=False`). This is Megatron's Switch loss
  with top-K counts, so the top-k router's machinery computes it (with its SP scale fixes).
  α = `model.moe.aux_loss_coeff`: the paper's best is 0.005 (configs/dit_moe.yaml), the
  reference code's default 0.01 (the schema default).
- Shared expert: Megatron's, `model.moe.shared_expert_ffn_hidden_size` (the code's one shared
  MLP of hidden n_shared·D = 2D, not the paper's "2 experts"; papers.md §16.5); required unless
  `model.moe.dit_moe.require_shared_expert=false`.

`model.moe.renormalize` is not read: raw weights are what makes this family. Token-choice
without capacity: causal.
"""

from __future__ import annotations

from megamoe.moe.routers.topk import TopKSoftmaxRouter


class DiTMoERouter(TopKSoftmaxRouter):
    paper = ("DiT-MoE (Fei et al. 2024, arXiv 2407.11633) §3.2, Eq. 5: softmax top-2, raw "
             "weights, shared expert, expert-level balance loss")

    def __init__(self, config, pg_collection=None, *, loss_free_bias_rate: float = 0.0):
        super().__init__(config=config, pg_collection=pg_collection, renormalize=False,
                         loss_free_bias_rate=loss_free_bias_rate)

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        return {"loss_free_bias_rate": moe_cfg.loss_free_bias_rate}
