"""Per-recursion LoRA on the shared layers (Relaxed Recursive Transformers, papers.md §2), on one
gloo rank of the test pool:

- a hooked linear computes W x + (α/R)·B A x (column- and row-parallel, hand computation);
  no adapter is selected outside the block's layer calls;
- at initialisation (B = 0) the relaxed model's loss equals the unrelaxed model's exactly
  (every other parameter is initialised identically, by checkpoint key); negative control: B ≠ 0;
- adapters are per unrolled position: perturbing adapter (r, 0) changes exactly the block
  outputs of the tokens that reach step r (expert-choice, k = 16, 8, 4 of S = 16);
- cached generation (mor/generate.py), which batches tokens of different recursion steps
  through one shared layer, applies each token's own adapter: its logits equal the full
  forward's (negative control: one adapter for the whole batch);
- the parameter count of `megamoe.mor.accounting` is the built model's;
- config errors name their field.
"""

import pytest
import torch

from megamoe.testing.pool import run_distributed

MOR = ["parallel.world_size=1", "model.num_layers=8", "model.mor.enabled=true",
       "model.mor.num_recursions=3", "model.mor.allow_non_causal=true",
       "model.moe.num_experts=0", "model.mor.capacities=[1.0,0.5,0.25]",
       "train.global_batch_size=2"]
LORA = ["model.mor.lora_rank=4", "model.mor.lora_targets=[qkv,proj,fc1,fc2]"]


def _engine(overrides):
    from megamoe.testing.parity import TINY_VOCAB, tiny_config
    from megamoe.engines.megatron import build_engine

    return build_engine(tiny_config(overrides), TINY_VOCAB, torch.device("cpu"),
                        with_optimizer=False, ddp=False)


def _recursion(engine):
    from megamoe.mor.decoder import mor_decoders

    return mor_decoders(engine.modules)[0].recursion


def _loss(engine) -> torch.Tensor:
    from megamoe.testing.parity import TINY_VOCAB, microbatch

    mb = microbatch(0, 0, 0, 1, 2, engine.cfg.model.seq_length, TINY_VOCAB)
    with torch.no_grad():
        return engine.modules[0](mb["tokens"], mb["position_ids"], None, labels=mb["labels"])


def adapter_math_task():
    """max |hooked linear − (W x + (α/R) B A x)| for qkv (column) and proj (row), the size of
    the LoRA term, and the error of a linear called outside any (r, j) (must be the plain W x)."""
    engine = _engine(MOR + ["model.mor.lora_rank=2", "model.mor.lora_alpha=3.0",
                            "model.mor.lora_targets=[qkv,proj]"])
    lora = _recursion(engine).lora
    layers = _recursion(engine).layers
    g = torch.Generator().manual_seed(0)
    errs, terms = [], []
    with torch.no_grad():
        for target, linear in (("qkv", layers[1].self_attention.linear_qkv),
                               ("proj", layers[1].self_attention.linear_proj)):
            adapter = lora[2][1][target]           # step 2, layer 1 of the step: pool slot 1
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=g))
            x = torch.randn(5, 3, linear.weight.shape[1], generator=g)
            want = x @ linear.weight.T + 1.5 * (x @ adapter.A.T @ adapter.B.T)   # α/R = 3/2
            lora.select(2, 1)
            got = linear(x)[0]
            lora.select(None)
            plain = linear(x)[0]
            errs.append((got - want).abs().max().item())
            terms.append((want - x @ linear.weight.T).abs().max().item())
            errs.append((plain - x @ linear.weight.T).abs().max().item())
    return errs, terms


def init_equals_unrelaxed_task():
    """(per-token losses with and without LoRA equal at init, max |Δ| of the per-token loss
    once one B ≠ 0, non-LoRA state equal)."""
    relaxed, plain = _engine(MOR + LORA), _engine(MOR)
    theirs = plain.modules[0].state_dict()
    same = all(torch.equal(v, theirs[k]) for k, v in relaxed.modules[0].state_dict().items()
               if isinstance(v, torch.Tensor) and ".lora." not in k)
    a, b = _loss(relaxed), _loss(plain)
    with torch.no_grad():
        _recursion(relaxed).lora[2][0]["fc2"].B.normal_(0, 1.0,
                                                        generator=torch.Generator().manual_seed(1))
    return torch.equal(a, b), (_loss(relaxed) - b).abs().max().item(), same


def per_position_task():
    """Tokens (of S·B = 32) whose block output changes when adapter (r, 0) is perturbed,
    r = 0, 1, 2."""
    engine = _engine(MOR + LORA)
    decoder = engine.modules[0].decoder
    block = decoder.recursion
    S, B = engine.cfg.model.seq_length, 2
    rope = engine.modules[0].rotary_pos_emb(S)
    x = torch.randn(S, B, engine.cfg.model.hidden_size, generator=torch.Generator().manual_seed(2))
    block.train()                            # expert-choice top-k: k = 16, 8, 4 per sequence
    changed = []
    with torch.no_grad():
        base = block(x, rope)
        for r in range(3):
            B_param = block.lora[r][0]["qkv"].B
            B_param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
            out = block(x, rope)
            B_param.zero_()
            changed.append(int(((out - base).abs().amax(-1) > 0).sum()))
        again = block(x, rope)
    return changed, torch.equal(again, base)


def generation_task(kv_sharing: bool):
    """(max |generated − forward logits|, same with the first token's adapter for every row,
    calls that mixed recursion steps)."""
    from megamoe.mor.generate import MoRGenerator, Request

    engine = _engine(MOR + LORA + [f"model.mor.kv_sharing={str(kv_sharing).lower()}"])
    model, block = engine.modules[0], _recursion(engine)
    with torch.no_grad():
        for w in block.router.parameters():      # exits spread over tokens
            w.mul_(30.0)
        g = torch.Generator().manual_seed(4)
        for name, p in block.lora.named_parameters():
            if name.endswith("B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    reqs = [Request([3, 17, 42], 9), Request([5, 1, 9, 33, 60, 2, 7], 4), Request([11, 12], 14)]
    select_rows, mixed = block.lora.select_rows, []

    def one_adapter(r_B, j):                   # negative control
        select_rows([r_B[0]] * len(r_B), j)

    def counting(r_B, j):
        mixed.append(len(set(r_B)) > 1)
        select_rows(r_B, j)

    errs = []
    for rows in (counting, one_adapter):
        block.lora.select_rows = rows
        runs, _ = MoRGenerator(model, max_len=16, slots=3).generate(reqs, max_batch=2,
                                                                    keep_logits=True)
        err = 0.0
        for res in runs:
            with torch.no_grad():
                full_TV = model(torch.tensor([res.tokens]), torch.arange(len(res.tokens))[None],
                                None)[0, :, :model.unpadded_vocab_size]
            got_TV = torch.stack(res.logits)
            err = max(err, (got_TV - full_TV[:len(got_TV)]).abs().max().item())
        errs.append(err)
    return errs[0], errs[1], sum(mixed)


def count_task(overrides):
    from megamoe.models.vocab import padding_elements
    from megamoe.testing.parity import TINY_VOCAB
    from megamoe.models.accounting import parameter_counts

    engine = _engine(overrides)
    lora = sum(p.numel() for n, p in engine.modules[0].named_parameters() if ".lora." in n)
    padding = padding_elements(engine.modules)       # vocabulary rows padded for TP
    return (sum(p.numel() for p in engine.modules[0].parameters()) - padding,
            parameter_counts(engine.cfg, TINY_VOCAB)[0], lora)


@pytest.mark.timeout(300)
def test_hooked_linear_adds_the_scaled_low_rank_term():
    errs, terms = run_distributed(adapter_math_task, 1)[0]
    assert min(terms) > 0.1                      # the LoRA term is not negligible
    assert max(errs) < 1e-5, errs                # W x + (α/R) B A x, and W x when unselected


@pytest.mark.timeout(300)
def test_relaxed_model_at_init_is_the_unrelaxed_model():
    equal, perturbed, same = run_distributed(init_equals_unrelaxed_task, 1)[0]
    assert same and equal                          # bit-identical per-token losses
    assert perturbed > 1e-3                        # negative control: B ≠ 0 is visible


@pytest.mark.timeout(300)
def test_each_recursion_step_has_its_own_adapter():
    changed, restored = run_distributed(per_position_task, 1)[0]
    assert changed == [32, 16, 8]                # B · k_r tokens run step r
    assert restored


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kv_sharing", [False, True], ids=["recursion_cache", "kv_sharing"])
def test_cached_generation_applies_each_tokens_adapter(kv_sharing):
    err, control, mixed_calls = run_distributed(generation_task, 1, kv_sharing)[0]
    assert mixed_calls > 0                       # some calls batch tokens of different steps
    assert err <= 1e-4, err
    assert control > 1e-3, control


@pytest.mark.timeout(300)
def test_parameter_count_includes_the_adapters():
    built, counted, lora = run_distributed(count_task, 1, MOR + LORA)[0]
    # per (r, j): R·(d_in + d_out), hidden 32, 4 heads × 8, 2 groups, ffn 64 (SwiGLU: fc1 → 128)
    per_position = 4 * ((32 + 64) + (32 + 32) + (32 + 128) + (64 + 32))
    assert lora == 3 * 2 * per_position          # N_r = 3 steps × 2 shared layers
    assert built == counted


def _config(overrides):
    from megamoe.testing.parity import tiny_config

    return tiny_config(overrides)


@pytest.mark.parametrize("override,field", [
    ("model.mor.lora_rank=-1", "model.mor.lora_rank"),
    ("model.mor.lora_alpha=0", "model.mor.lora_alpha"),
    ("model.mor.lora_dropout=1.0", "model.mor.lora_dropout"),
    ("model.mor.lora_targets=[q]", "model.mor.lora_targets"),
    ("model.mor.lora_targets=[qkv,qkv]", "model.mor.lora_targets"),
    ("model.mor.lora_targets=[]", "model.mor.lora_targets"),
])
def test_bad_lora_options_name_their_field(override, field):
    from megamoe.config.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{field}:"):
        _config(MOR + [override])


def test_lora_on_moe_ffns_is_refused():
    from megamoe.config.errors import ConfigError

    moe = [o for o in MOR if "num_experts" not in o]            # MoE FFNs in every layer
    _config(moe + ["model.mor.lora_rank=4", "model.mor.lora_targets=[qkv,proj]"])
    with pytest.raises(ConfigError, match="^model.mor.lora_targets:.*MoE"):
        _config(moe + ["model.mor.lora_rank=4", "model.mor.lora_targets=[qkv,fc1]"])


def test_hugging_face_export_takes_lora():
    """LoRA models export with the remote code (logits checked in tests/unit/test_hf_mor_lora.py):
    the export lists no problem for them, as for the unrelaxed model."""
    from megamoe.checkpoint.hf_megamoe import problems

    assert problems(_config(MOR + ["model.mor.lora_rank=4"])) == problems(_config(MOR)) == []
