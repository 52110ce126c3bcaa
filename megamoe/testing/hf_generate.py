"""Checks of exported Hugging Face folders under whichever transformers is importable: greedy
`generate` (KV cache, only new tokens fed) equals recomputing the whole prefix, and the logits
equal megamoe's.

Imports only torch and transformers, not megamoe, so that a test can run it as a script with
another transformers release first on PYTHONPATH (tests/unit/test_hf_transformers_range.py):

    python megamoe/testing/hf_generate.py FOLDER[=REF.pt] ...

prints one JSON object {"transformers": version, "folders": {FOLDER: check_folder(...)}}.
REF.pt holds {"tokens": [B, S] ids, "logits": megamoe's [B, S, V] logits}.

Shapes: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import json
import sys

import torch

BATCHES = (1, 4, 8)          # prompt batch sizes of the generate check
PROMPT_LEN, NEW_TOKENS = 6, 4


def load_folder(folder: str):
    """transformers' model of the folder (remote code allowed, nothing downloaded), eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=True, local_files_only=True).eval()


@torch.no_grad()
def greedy_matches_recompute(model, prompt_BS, steps: int) -> bool:
    """Whether `generate` (greedy) gives the tokens of recomputing the whole prefix each step."""
    out_BS = model.generate(prompt_BS, max_new_tokens=steps, do_sample=False)
    ref_BS = prompt_BS
    for _ in range(steps):
        next_B1 = model(ref_BS, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ref_BS = torch.cat([ref_BS, next_B1], dim=1)
    return torch.equal(out_BS, ref_BS)


@torch.no_grad()
def check_folder(folder: str, ref_path: str | None = None) -> dict:
    """{"greedy": {B: generate = recompute} for B in BATCHES, "logits_err": max |Δ| of the
    logits (no KV cache) from the reference's, None without one}."""
    model = load_folder(folder)
    g = torch.Generator().manual_seed(0)
    prompts = {B: torch.randint(0, model.config.vocab_size, (B, PROMPT_LEN), generator=g)
               for B in BATCHES}
    result = {"greedy": {B: greedy_matches_recompute(model, p_BS, NEW_TOKENS)
                         for B, p_BS in prompts.items()},
              "logits_err": None}
    if ref_path is not None:
        ref = torch.load(ref_path)
        got_BSV = model(ref["tokens"], use_cache=False).logits.float()
        result["logits_err"] = (got_BSV - ref["logits"]).abs().max().item()
    return result


def main(argv: list[str]) -> None:
    import transformers

    folders = {}
    for arg in argv:
        folder, _, ref_path = arg.partition("=")
        folders[folder] = check_folder(folder, ref_path or None)
    print(json.dumps({"transformers": transformers.__version__, "folders": folders}))


if __name__ == "__main__":
    main(sys.argv[1:])
