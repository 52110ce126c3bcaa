"""Cached generation for Mixture-of-Recursions models, with continuous depth-wise batching
(Bae et al., arXiv 2507.10524, §2.2.2, §3.3 and App. C; papers.md §1.6–§1.7).

Inference-mode routing is per token and causal: expert-choice continues a token at step r iff
it was kept at r−1 and σ(z_t^r) > 0.5 (a step of capacity 1 keeps every token); token-choice
runs a token to its argmax depth. So generation can treat every position as an independent
work item once its predecessors are done:

    embed + unique first layer  →  recursion steps 0, 1, … (until the token exits)
                                 →  unique last layer + final norm + LM head → next token

KV caches, one per layer *application* (unique layer, or (step r, layer j) of the shared pool):
- recursion-wise caching: at step r a token attends to, and writes, the cache of (r, j), which
  therefore holds the tokens that were active at step r;
- recursive KV sharing: steps r > 0 read the cache of (0, j) (every token passes step 0) and
  write nothing.
This is exactly what the training-time block computes with compaction, so the logits of cached
generation equal the full forward's (tests/unit/mor/test_mor_generate.py).

Scheduling (`policy`): all recursion steps share one parameter pool, so tokens at different
depths run in one batch of at most `max_batch` tokens.
- "depth"    (continuous depth-wise batching): a token that exits frees its slot at once and a
             queued token fills it; exited tokens wait, up to `max_batch` of them, for one
             batched pass of the last layer + head + embedding + first layer of the next token.
- "sequence" (the baseline): a batch enters the block together and the next one only when all
             its tokens have exited; early-exited tokens leave their slots idle.

Shapes: B tokens of a batch (one per sequence), L cached keys, D hidden, G query groups,
h head dim, V vocabulary, d rotary dim. One process (TP = EP = 1), eval mode.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from megamoe.mor.attention import DecodeKV
from megamoe.mor.expert_choice import ExpertChoiceDepthRouter

POLICIES = ("depth", "sequence")


@dataclass
class Request:
    prompt: list            # token ids, at least one
    max_new_tokens: int


@dataclass
class Generated:
    tokens: list                                  # prompt + generated ids
    depths: list = field(default_factory=list)    # recursion steps run at each position
    logits: list = field(default_factory=list)    # [V] per position (keep_logits=True)


@dataclass
class GenerationStats:
    generated_tokens: int = 0
    block_calls: int = 0             # batched recursion steps (one tick of the shared block)
    block_tokens: int = 0            # Σ tokens over those calls
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def mean_block_batch(self) -> float:
        return self.block_tokens / self.block_calls if self.block_calls else 0.0


class _Token:
    """One position of one sequence, in flight."""
    __slots__ = ("req", "slot", "pos", "token_id", "h", "h1", "r", "depth", "gate", "steps_run")

    def __init__(self, req: int, slot: int, pos: int, token_id: int):
        self.req, self.slot, self.pos, self.token_id = req, slot, pos, token_id
        self.h = self.h1 = self.gate = None
        self.r, self.depth, self.steps_run = 0, None, 0


class KVStore:
    """K/V of every sequence slot for one layer application, [slots, max_len, G, h]
    (pre-RoPE), with the position of each entry and the count per slot."""

    def __init__(self, slots: int, max_len: int, groups: int, head_dim: int, dtype, device):
        self.k = torch.zeros(slots, max_len, groups, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(slots, max_len, dtype=torch.long, device=device)
        self.count = torch.zeros(slots, dtype=torch.long)          # host-side

    def read(self, slots_N: torch.Tensor, L: int):
        """(k, v, pos, count) of these slots, padded to L: [N, L, G, h] ×2, [N, L], [N]."""
        dev = self.k.device
        at = slots_N.to(dev)
        return self.k[at, :L], self.v[at, :L], self.pos[at, :L], self.count[slots_N]

    def append(self, slots_N: torch.Tensor, k_NGh, v_NGh, pos_N: torch.Tensor) -> None:
        at, n_N = slots_N.to(self.k.device), self.count[slots_N].to(self.k.device)
        self.k[at, n_N], self.v[at, n_N], self.pos[at, n_N] = k_NGh, v_NGh, pos_N
        self.count[slots_N] += 1

    def reset(self, slot: int) -> None:
        self.count[slot] = 0


def _by_key(keys: list) -> dict:
    """key -> indices of the batch entries that use it."""
    groups: dict = {}
    for b, key in enumerate(keys):
        groups.setdefault(key, []).append(b)
    return groups


class MoRGenerator:
    """Cached generation with a GPTModel whose decoder is a `MoRDecoder` (see module doc).

    `kv_sharing`: the KV strategy of the caches; None takes the model's (`model.mor.kv_sharing`).
    Overriding it computes something else than the model — the tests use that as a control."""

    def __init__(self, model, *, max_len: int, slots: int, kv_sharing: bool | None = None):
        from megamoe.mor.decoder import MoRDecoder

        dec = model.decoder
        if not isinstance(dec, MoRDecoder):
            raise ValueError("model.mor.enabled: generation with MoRGenerator needs a "
                             "Mixture-of-Recursions model")
        c = dec.config
        if c.tensor_model_parallel_size > 1 or c.expert_model_parallel_size > 1 or \
                c.pipeline_model_parallel_size > 1:
            raise ValueError("parallel: MoR generation runs on one process (tensor, expert and "
                             "pipeline parallel sizes 1)")
        if c.moe_expert_capacity_factor is not None:
            raise ValueError("model.moe.capacity_factor: token dropping depends on which tokens "
                             "share a batch, so batched generation would not match the forward")
        contextual = {type(m.router).__name__ for m in dec.modules()
                      if getattr(getattr(m, "router", None), "needs_context", ())}
        if contextual:
            raise ValueError(f"model.moe.router: {sorted(contextual)} read per-token routing "
                             "context (modality ids), which generation does not supply yet")
        router = dec.recursion.router
        if isinstance(router, ExpertChoiceDepthRouter) and router.inference_rule != "threshold":
            raise ValueError("model.mor.inference_rule=topk: top-k over the whole sequence is "
                             "not causal; generation needs the σ > 0.5 rule (threshold)")
        if max_len < 1 or slots < 1:
            raise ValueError(f"max_len={max_len}, slots={slots}: both must be ≥ 1")
        self.model, self.dec, self.router = model, dec, router
        self.block = dec.recursion
        self.kv_sharing = self.block.kv_sharing if kv_sharing is None else kv_sharing
        self.max_len, self.slots = max_len, slots
        self.expert = isinstance(router, ExpertChoiceDepthRouter)
        p = next(model.parameters())
        self.rope_Ld = model.rotary_pos_emb(max_len)[:, 0, 0].to(p.device)     # [max_len, d]
        attn = self.block.layers[0].self_attention
        G, h = attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head
        store = lambda: KVStore(slots, max_len, G, h, p.dtype, p.device)  # noqa: E731
        self.stores = {}
        self.unique = dict(zip([u for u in dec.units if u != "block"], dec.layers))
        for unit in self.unique:                     # "first", "last" (Middle-* sharing)
            self.stores[unit] = store()
        for r, step in enumerate(self.block.steps):
            for j in range(len(step)):
                if not (self.kv_sharing and r > 0):
                    self.stores[(r, j)] = store()

    # ---- model pieces on a batch of tokens ---------------------------------------------------

    def _layer(self, layer, x_1BD, toks: list, keys: list, append: bool) -> torch.Tensor:
        """One TransformerLayer on one new token per sequence, attending to cache `keys[b]`."""
        B, dev = len(toks), x_1BD.device
        slots_B = torch.tensor([t.slot for t in toks])
        groups = {k: torch.tensor(idx) for k, idx in _by_key(keys).items()}
        L = max(int(self.stores[k].count[slots_B[idx]].max()) for k, idx in groups.items())
        any_store = self.stores[keys[0]]
        past_k = x_1BD.new_zeros(B, L, *any_store.k.shape[2:])
        past_v = torch.zeros_like(past_k)
        pos_BL = torch.zeros(B, L, dtype=torch.long, device=dev)
        count_B = torch.zeros(B, dtype=torch.long)
        for k, idx in groups.items():
            at = idx.to(dev)
            past_k[at], past_v[at], pos_BL[at], count_B[idx] = self.stores[k].read(
                slots_B[idx], L)
        valid_BL = torch.arange(L)[None, :] < count_B[:, None]
        q_pos_B = torch.tensor([t.pos for t in toks])
        if append:                                  # the new token is a key of its own query
            pos_BL = torch.cat([pos_BL, q_pos_B[:, None].to(dev)], 1)
            valid_BL = torch.cat([valid_BL, valid_BL.new_ones(B, 1)], 1)
        rope = (self.rope_Ld[q_pos_B.to(dev)][None, :, None], self.rope_Ld[pos_BL.T][:, :, None])
        ctx = DecodeKV(past_k.transpose(0, 1), past_v.transpose(0, 1), append=append)
        attn = layer.self_attention
        attn.kv_context = ctx
        try:
            out_1BD, _ = layer(x_1BD, attention_mask=~valid_BL[:, None, None, :].to(dev),
                               rotary_pos_emb=rope)
        finally:
            attn.kv_context = None
        if append:
            k_1BGh, v_1BGh = ctx.new_kv
            for k, idx in groups.items():
                at = idx.to(dev)
                self.stores[k].append(slots_B[idx], k_1BGh[0, at], v_1BGh[0, at],
                                      q_pos_B[idx].to(dev))
        return out_1BD

    def _enter(self, toks: list) -> None:
        """Embedding + unique first layer (+ token-choice depth) of new positions."""
        ids_B1 = torch.tensor([[t.token_id] for t in toks], device=self.rope_Ld.device)
        pos_B1 = torch.tensor([[t.pos] for t in toks], device=self.rope_Ld.device)
        h_1BD = self.model.embedding(input_ids=ids_B1, position_ids=pos_B1)
        if "first" in self.unique:
            h_1BD = self._layer(self.unique["first"], h_1BD, toks, ["first"] * len(toks), True)
        if not self.expert:                                  # [B, 1] depth and gate
            _, _, depth_B1, gate_B1 = self.router.assign(h_1BD.transpose(0, 1))
            for b, t in enumerate(toks):
                t.depth, t.gate = int(depth_B1[b, 0]), gate_B1[b, 0]
        for b, t in enumerate(toks):
            t.h = t.h1 = h_1BD[0, b]

    def _head(self, toks: list) -> torch.Tensor:
        """Unique last layer + final norm + LM head: logits [B, V] over the unpadded
        vocabulary (megamoe.models.vocab)."""
        h_1BD = torch.stack([t.h for t in toks])[None]
        if "last" in self.unique:
            h_1BD = self._layer(self.unique["last"], h_1BD, toks, ["last"] * len(toks), True)
        if self.dec.final_layernorm is not None:
            h_1BD = self.dec.final_layernorm(h_1BD)
        m = self.model
        weight = m.shared_embedding_or_output_weight() if \
            m.share_embeddings_and_output_weights else None
        logits_1BV, _ = m.output_layer(h_1BD, weight=weight)
        return logits_1BV[0, :, :m.unpadded_vocab_size]

    def _continues(self, toks: list) -> list[bool]:
        """Expert-choice: does each token run its next step r (the router's causal inference
        rule)? Sets its gate g = α·σ(z). Token-choice: r ≤ its depth."""
        if not self.expert:
            return [t.r <= t.depth for t in toks]
        out = [False] * len(toks)
        for r, idx in _by_key([t.r for t in toks]).items():
            z_N = self.router.logits(r, torch.stack([toks[b].h for b in idx]))
            gate_N = self.router.alpha * torch.sigmoid(z_N)
            for n, (b, keep) in enumerate(zip(idx, self.router.threshold_keep(r, z_N).tolist())):
                toks[b].gate, out[b] = gate_N[n], keep
        return out

    def _recursion_tick(self, toks: list, stats: GenerationStats) -> None:
        """Run each token's current recursion step (tokens grouped by the pool layers their
        step applies; Cycle-type sharing: one group)."""
        for layer_ids, idx in _by_key([self.block.steps[t.r] for t in toks]).items():
            group = [toks[b] for b in idx]
            x_1BD = torch.stack([t.h for t in group])[None]
            for j, m in enumerate(layer_ids):
                keys = [(0 if self.kv_sharing else t.r, j) for t in group]
                x_1BD = self._run_shared(self.block.layers[m], x_1BD, group, keys)
            self._after_step(group, x_1BD[0])
        stats.block_calls += 1
        stats.block_tokens += len(toks)

    def _run_shared(self, layer, x_1BD, group, keys):
        """A shared layer on tokens that may be at different steps: under KV sharing the
        step-0 tokens write (0, j) and the others only read it (two calls)."""
        if not self.kv_sharing:
            return self._lora_layer(layer, x_1BD, group, keys, True)
        first = [b for b, t in enumerate(group) if t.r == 0]
        later = [b for b, t in enumerate(group) if t.r > 0]
        out = torch.empty_like(x_1BD)
        for idx, append in ((first, True), (later, False)):
            if idx:
                out[:, idx] = self._lora_layer(layer, x_1BD[:, idx], [group[b] for b in idx],
                                               [keys[b] for b in idx], append)
        return out

    def _lora_layer(self, layer, x_1BD, toks: list, keys: list, append: bool):
        """`_layer` on shared layer j (from `keys`) with each token's LoRA adapter of (its
        step r, j) (model.mor.lora_rank, lora.py)."""
        lora = self.block.lora
        if lora is not None:
            lora.select_rows([t.r for t in toks], keys[0][1])
        try:
            return self._layer(layer, x_1BD, toks, keys, append)
        finally:
            if lora is not None:
                lora.select(None)

    def _after_step(self, toks: list, f_BD: torch.Tensor) -> None:
        g_f_BD = self.block.gated(f_BD, torch.stack([t.gate for t in toks]))
        if self.expert:                                 # H^{r+1} = H^r + g·f(H^r)
            new_BD = torch.stack([t.h for t in toks]) + g_f_BD
        else:                                           # at i_t: H^1 + g·f(H^{i_t}); else f
            h1_BD = torch.stack([t.h1 for t in toks])
            exit_B1 = torch.tensor([[t.r == t.depth] for t in toks], device=f_BD.device)
            new_BD = torch.where(exit_B1, h1_BD + g_f_BD, f_BD)
        for b, t in enumerate(toks):
            t.h = new_BD[b]
            t.r += 1
            t.steps_run += 1

    # ---- scheduling --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, requests: list, *, max_batch: int = 8, policy: str = "depth",
                 keep_logits: bool = False, temperature: float = 0.0,
                 seed: int = 0) -> tuple[list, GenerationStats]:
        """Generate for every request (greedy, or sampled with `temperature` > 0); prompts are
        fed one position at a time through the same cached path."""
        import time

        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: one of {POLICIES}")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be ≥ 1")
        for i, req in enumerate(requests):
            if not req.prompt or req.max_new_tokens < 0:
                raise ValueError(f"requests[{i}]: needs a prompt and max_new_tokens ≥ 0")
            if len(req.prompt) + req.max_new_tokens > self.max_len:
                raise ValueError(f"requests[{i}]: {len(req.prompt)} prompt + "
                                 f"{req.max_new_tokens} new tokens exceed max_len={self.max_len}")
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out = [Generated(list(r.prompt)) for r in requests]
        stats = GenerationStats()
        waiting, free = deque(range(len(requests))), list(range(self.slots))[::-1]
        entering, queue, block, exited = [], deque(), [], []
        t0 = time.perf_counter()
        try:
            while waiting or entering or queue or block or exited:
                while waiting and free:                  # admit new sequences
                    i = waiting.popleft()
                    slot = free.pop()
                    for s in self.stores.values():
                        s.reset(slot)
                    entering.append(_Token(i, slot, 0, requests[i].prompt[0]))
                if entering:                             # run step 0 or exit right away
                    self._enter(entering)
                    for t, go in zip(entering, self._continues(entering)):
                        (queue if go else exited).append(t)
                    entering = []
                if policy == "depth" or not block:       # fill the free slots
                    while queue and len(block) < max_batch:
                        block.append(queue.popleft())
                if block:
                    self._recursion_tick(block, stats)
                    left = [t for t in block if t.r < len(self.block.steps)]
                    go = self._continues(left)
                    exited += [t for t in block if t.r >= len(self.block.steps)]
                    exited += [t for t, g in zip(left, go) if not g]
                    block = [t for t, g in zip(left, go) if g]
                flush = (len(exited) >= max_batch or not (block or queue)) if \
                    policy == "depth" else not block
                if exited and flush:
                    entering = self._finish(exited, requests, out, free, keep_logits,
                                            temperature, gen, stats)
                    exited = []
        finally:
            self.model.train(was_training)
        stats.seconds = time.perf_counter() - t0
        return out, stats

    def _finish(self, toks, requests, out, free, keep_logits, temperature, gen, stats):
        """Head pass of exited tokens; their sequences' next positions (or the end)."""
        logits_BV = self._head(toks)
        nxt = []
        for b, t in enumerate(toks):
            res, req = out[t.req], requests[t.req]
            res.depths.append(t.steps_run)
            if keep_logits:
                res.logits.append(logits_BV[b].float().cpu())
            pos, total = t.pos + 1, len(req.prompt) + req.max_new_tokens
            if pos < len(req.prompt):                      # still reading the prompt
                nxt.append(_Token(t.req, t.slot, pos, req.prompt[pos]))
            elif pos < total:
                token_id = _pick(logits_BV[b], temperature, gen)
                res.tokens.append(token_id)
                stats.generated_tokens += 1
                if pos + 1 < total:                         # its logits are needed
                    nxt.append(_Token(t.req, t.slot, pos, token_id))
                else:
                    free.append(t.slot)
            else:
                free.append(t.slot)
        return nxt



def _pick(logits_V: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.float().cpu() / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=gen))
