"""`megamoe generate`: a Mixture-of-Recursions checkpoint (saved under any layout) loaded on one
CPU process, cached generation with depth-wise batching (megamoe.mor.generate), completions
printed with the recursion steps each token ran and the tokens/s."""

from __future__ import annotations

from megamoe.mor.generate import MoRGenerator, Request


def generate_from_checkpoint(src: str, *, texts=(), id_prompts=(), max_new_tokens: int = 32,
                             temperature: float = 0.0, seed: int = 0, max_batch: int = 8,
                             policy: str = "depth", log=print) -> list:
    """`megamoe generate`: load `src` on one CPU rank, generate for every prompt, print."""
    from megamoe.commands.convert import load_one_rank

    if not texts and not id_prompts:
        raise ValueError("--prompt / --prompt-ids: give at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens}: must be ≥ 1")
    if max_batch < 1:
        raise ValueError(f"--batch={max_batch}: must be ≥ 1")
    if temperature < 0:
        raise ValueError(f"--temperature={temperature}: must be ≥ 0 (0 is greedy)")
    engine, cfg, step_dir, meta = load_one_rank(src, log=log)
    if not cfg.model.mor.enabled:
        raise ValueError(f"{step_dir}: model.mor.enabled is false; megamoe generates with "
                         "Mixture-of-Recursions models only (export others with `megamoe "
                         "convert --to hf` and use transformers' generate)")
    tok = None
    if texts:
        if not cfg.data.tokenizer:
            raise ValueError(f"--prompt: the run has no data.tokenizer (it trained on token "
                             f"ids); use --prompt-ids")
        from megamoe.data.tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(cfg.data.tokenizer)
    vocab = int(meta["vocab_size"])
    prompts = [tok.encode(t) for t in texts]
    for i, ids in enumerate(id_prompts):
        try:
            prompts.append([int(x) for x in ids.split()])
        except ValueError:
            raise ValueError(f"--prompt-ids[{i}]={ids!r}: space-separated integers") from None
    for i, p in enumerate(prompts):
        bad = [x for x in p if not 0 <= x < vocab]
        if not p or bad:
            raise ValueError(f"prompt {i}: {'empty' if not p else f'token ids {bad} outside 0..{vocab - 1}'}")
    max_len = max(len(p) for p in prompts) + max_new_tokens
    gen = MoRGenerator(engine.modules[0], max_len=max_len, slots=len(prompts))
    out, stats = gen.generate([Request(p, max_new_tokens) for p in prompts],
                              max_batch=max_batch, policy=policy, temperature=temperature,
                              seed=seed)
    for p, res in zip(prompts, out):
        new = res.tokens[len(p):]
        shown = tok.decode(new) if tok is not None else " ".join(map(str, new))
        depths = res.depths[len(p) - 1:]
        log(f"[{'text' if tok else 'ids'}] {shown}")
        log(f"  recursion steps per generated token: {' '.join(map(str, depths))}")
    log(f"[megamoe] {stats.generated_tokens} tokens in {stats.seconds:.2f} s "
        f"({stats.tokens_per_s:.1f} tokens/s, {policy}-wise batching, mean block batch "
        f"{stats.mean_block_batch:.2f})")
    return out
