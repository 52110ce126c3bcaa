"""megamoe.config: loading, overrides, round trip, and one case per validation error."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import pytest

from megamoe.config import (
    Config,
    ConfigError,
    config_to_dict,
    dump_config,
    load_config,
    num_microbatches,
    resolve_run_dir,
    sequence_parallel_enabled,
    validate,
)

REPO = Path(__file__).resolve().parents[2]


def load_checked(path=None, overrides=()):
    """load_config, then the config's own checks across sections (models.checks.check_config
    without the launch checks of this machine's device and files)."""
    from megamoe.models.checks import check_config

    cfg = load_config(path, overrides)
    check_config(cfg, launch=False)
    return cfg


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_load_and_validate():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.parallel.data == 1 and cfg.parallel.expert_data == 1
    assert num_microbatches(cfg) == 4           # 16 / (4 · 1)
    assert not sequence_parallel_enabled(cfg)


def test_quickstart_loads():
    cfg = load_config(REPO / "configs" / "lm_quickstart.yaml")
    p = cfg.parallel
    assert (p.world_size, p.tensor, p.pipeline, p.expert) == (4, 2, 1, 2)
    assert p.data == 2 and p.expert_tensor_size == 1 and p.expert_data == 2
    assert sequence_parallel_enabled(cfg)
    assert num_microbatches(cfg) == 2           # 16 / (4 · 2)
    assert cfg.train.lr == pytest.approx(3e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.num_query_groups == 2 and cfg.model.vocab_size is None
    assert cfg.data.kind == "markov"


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, """
model:
  num_layers: 2
  moe: {num_experts: 8, layer_freq: [1, 0]}
train:
  lr: 3e-3          # YAML 1.1 reads this as a string; float fields accept it
  min_lr: 0
""")
    cfg = load_config(path, ["train.lr=1e-3", "model.moe.topk=4", "run.dir=null",
                             "run.name=2024", "parallel.sequence_parallel=true"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 64     # untouched default
    assert cfg.model.moe.num_experts == 8 and cfg.model.moe.topk == 4
    assert cfg.model.moe.layer_freq == [1, 0]
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 0.0
    assert isinstance(cfg.train.min_lr, float)
    assert cfg.run.dir is None and cfg.run.name == "2024"
    # SP requested without TP is allowed and resolves to off.
    assert cfg.parallel.sequence_parallel is True and not sequence_parallel_enabled(cfg)


def test_yaml_float_string_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 3e-3, adam_eps: 1e-8}\n"))
    assert cfg.train.lr == 3e-3 and cfg.train.adam_eps == 1e-8


def test_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "lm_quickstart.yaml",
                      ["model.moe.layer_freq=[1,0,1,0]", "model.moe.capacity_factor=1.25",
                       "train.adam_eps=1e-8", "run.dir=runs/x"])
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    # Negative control: equality notices a one-field change.
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, adam_eps=2e-8))
    assert changed != cfg


def test_resolve_run_dir():
    cfg = load_config(None, ["run.name=tiny"])
    assert resolve_run_dir(cfg, now=datetime(2026, 3, 4, 5, 6, 7)) == "runs/tiny-20260304-050607"
    assert cfg.run.dir is None                                   # not mutated
    assert resolve_run_dir(load_config(None, ["run.dir=/tmp/r"])) == "/tmp/r"


def test_allowed_layouts():
    load_checked(None, ["parallel.world_size=2", "parallel.pipeline=2",
                        "model.tie_embeddings=true"])
    load_checked(None, ["model.moe.num_experts=0"])               # dense: topk is ignored
    load_checked(None, ["parallel.world_size=4", "parallel.pipeline=2",   # 4 micro-batches
                       "parallel.virtual_pipeline=2", "train.global_batch_size=8",
                       "train.micro_batch_size=2"])


def test_validate_on_a_built_config():
    cfg = Config()
    validate(cfg)
    cfg.train.lr = "fast"
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got str 'fast'"):
        validate(cfg)
    cfg.train.lr = "3e-3"                      # strings are parsed only when loading text
    with pytest.raises(ConfigError, match=r"train\.lr"):
        validate(cfg)


@pytest.mark.parametrize("text, fragment", [
    ("model: [1, 2\n", "line 2"),
    ("train:\n  lr: 1\n  lr: 2\n", "duplicate key 'lr'"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_file_errors(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_section_of_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(write(tmp_path, "model: 3\n"))


def test_empty_file_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == Config()


def p(overrides: str, field: str, fragment: str = ""):
    """One error case: space-separated overrides, the dotted field the message must name, and an
    optional further fragment it must contain."""
    return pytest.param(overrides.split(), field, fragment, id=f"{field}:{overrides}")


TP2 = "parallel.world_size=2 parallel.tensor=2 "
ERRORS = [
    # parallel grid
    p("parallel.world_size=3 parallel.tensor=2", "parallel.world_size",
      "parallel.tensor * parallel.pipeline"),
    p("parallel.world_size=2 parallel.tensor=4", "parallel.world_size", ">= 1"),
    p("parallel.world_size=0", "parallel.world_size", ">= 1"),
    p("parallel.tensor=0", "parallel.tensor", ">= 1"),
    p(TP2 + "parallel.expert=2", "parallel.world_size",
      "parallel.expert_tensor (= tensor) * parallel.expert * parallel.pipeline"),
    p("parallel.world_size=4 parallel.expert=4 model.moe.num_experts=6", "model.moe.num_experts"),
    p("parallel.world_size=2 parallel.expert=2 model.moe.num_experts=0", "parallel.expert"),
    # tensor parallelism vs shapes
    p(TP2 + "model.num_attention_heads=3 model.kv_channels=16", "model.num_attention_heads"),
    p("parallel.world_size=4 parallel.tensor=4 model.num_query_groups=2", "model.num_query_groups"),
    p("model.num_query_groups=3", "model.num_query_groups", "num_attention_heads"),
    p(TP2 + "model.ffn_hidden_size=127", "model.ffn_hidden_size", "parallel.tensor"),
    p(TP2 + "model.moe.ffn_hidden_size=127", "model.moe.ffn_hidden_size", "expert_tensor"),
    p(TP2 + "model.moe.shared_expert_ffn_hidden_size=127",
      "model.moe.shared_expert_ffn_hidden_size", "parallel.tensor"),
    p("model.hidden_size=66", "model.hidden_size", "num_attention_heads"),
    # pipeline
    p("parallel.world_size=3 parallel.pipeline=3", "model.num_layers", "parallel.pipeline"),
    p("parallel.world_size=2 parallel.pipeline=2 parallel.virtual_pipeline=4", "model.num_layers",
      "virtual_pipeline"),
    p("parallel.virtual_pipeline=2", "parallel.virtual_pipeline", "pipeline > 1"),
    p("parallel.world_size=4 parallel.pipeline=4 parallel.virtual_pipeline=1 "
      "train.global_batch_size=8", "parallel.virtual_pipeline", "interleaved"),
    p("parallel.world_size=2 parallel.pipeline=2 parallel.virtual_pipeline=2 "
      "train.global_batch_size=12", "parallel.virtual_pipeline", "divisible"),
    # batch
    p("train.global_batch_size=10", "train.global_batch_size", "micro_batch_size"),
    p("train.micro_batch_size=0", "train.micro_batch_size", ">= 1"),
    p("train.global_batch_size=-16", "train.global_batch_size", ">= 1"),
    p("train.steps=0", "train.steps", ">= 1"),
    # sequence parallelism
    p(TP2 + "parallel.sequence_parallel=false", "parallel.sequence_parallel",
      "Megatron requires sequence parallelism with MoE and tensor parallelism"),
    p(TP2 + "model.seq_length=63", "model.seq_length", "parallel.tensor"),
    # MoE
    p("model.moe.topk=5", "model.moe.topk", "5 > model.moe.num_experts (4)"),
    p("model.moe.topk=0", "model.moe.topk", ">= 1"),
    p("model.moe.layer_freq=[1,0,1]", "model.moe.layer_freq", "3 entries"),
    p("model.moe.layer_freq=[1,2,1,0]", "model.moe.layer_freq", "0 and 1"),
    p("model.moe.layer_freq=0", "model.moe.layer_freq", ">= 1"),
    p("model.moe.pad_to_capacity=true", "model.moe.pad_to_capacity", "capacity_factor"),
    p("model.moe.shared_expert_gate=true", "model.moe.shared_expert_gate"),
    # out of range
    p("train.lr=0", "train.lr", "must be > 0"),
    p("train.lr=-1e-3", "train.lr", "must be > 0"),
    # non-finite floats, refused naming the field (inf passes every range check)
    p("train.lr=.nan", "train.lr", "must be a finite number, got nan"),
    p("train.lr=inf", "train.lr", "must be a finite number, got inf"),
    p("train.clip_grad=.inf", "train.clip_grad", "must be a finite number, got inf"),
    p("model.moe.capacity_factor=inf", "model.moe.capacity_factor", "finite number"),
    p("model.rotary_base=-inf", "model.rotary_base", "must be a finite number, got -inf"),
    p("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by", ">= 1"),
    p("model.make_vocab_size_divisible_by=1.5", "model.make_vocab_size_divisible_by",
      "expected int"),
    p("train.min_lr=-1", "train.min_lr", ">= 0"),
    p("train.min_lr=1", "train.min_lr", "> train.lr"),
    p("train.warmup_steps=-1", "train.warmup_steps", ">= 0"),
    p("train.warmup_steps=101", "train.warmup_steps", "> train.steps"),
    p("train.weight_decay=-0.1", "train.weight_decay", ">= 0"),
    p("train.adam_beta1=1.0", "train.adam_beta1", "[0, 1)"),
    p("train.adam_beta2=-0.1", "train.adam_beta2", "[0, 1)"),
    p("train.adam_eps=0", "train.adam_eps", "> 0"),
    p("train.clip_grad=-1", "train.clip_grad", ">= 0"),
    p("train.eval_iters=-1", "train.eval_iters", ">= 0"),
    p("train.eval_interval=-1", "train.eval_interval", ">= 0"),
    p("train.save_interval=-1", "train.save_interval", ">= 0"),
    p("model.moe.capacity_factor=0", "model.moe.capacity_factor", "> 0"),
    p("data.valid_fraction=0", "data.valid_fraction", "(0, 0.5]"),
    p("data.valid_fraction=0.6", "data.valid_fraction", "(0, 0.5]"),
    p("model.moe.aux_loss_coeff=-0.01", "model.moe.aux_loss_coeff", ">= 0"),
    p("model.moe.z_loss_coeff=-1", "model.moe.z_loss_coeff", ">= 0"),
    p("model.norm_epsilon=0", "model.norm_epsilon", "> 0"),
    p("model.init_method_std=0", "model.init_method_std", "> 0"),
    p("model.seq_length=1", "model.seq_length", ">= 2"),
    p("model.hidden_size=0", "model.hidden_size", ">= 1"),
    p("model.ffn_hidden_size=0", "model.ffn_hidden_size", ">= 1"),
    p("model.moe.ffn_hidden_size=0", "model.moe.ffn_hidden_size", ">= 1"),
    p("model.num_layers=0", "model.num_layers", ">= 1"),
    p("model.vocab_size=0", "model.vocab_size", ">= 1"),
    p("run.log_interval=0", "run.log_interval", ">= 1"),
    p("data.markov_branching=65", "data.markov_branching", "markov_vocab_size"),
    # enums list the allowed values
    p("model.moe.score_function=relu", "model.moe.score_function", "softmax | sigmoid"),
    p("model.moe.drop_policy=random", "model.moe.drop_policy", "probs | position"),
    p("model.moe.token_dispatcher=flex", "model.moe.token_dispatcher", "alltoall | allgather"),
    p("model.moe.router=no_such_family", "model.moe.router", "topk"),
    p("train.lr_schedule=linear", "train.lr_schedule", "cosine | constant"),
    p("train.optimizer=adam", "train.optimizer", "adamw | sgd"),
    p("train.precision=fp16", "train.precision", "auto | fp32 | bf16"),
    p("data.kind=web", "data.kind", "markov | indexed"),
    p("data.kind=indexed", "data.path", "required"),
    p("data.kind=scenes", "data.kind", "model.family: vlm"),
    p("data.max_shapes=5", "data.max_shapes", "[1, 4]"),
    p("data.caption_fraction=1.5", "data.caption_fraction", "[0, 1]"),
    # types
    p("train.lr=abc", "train.lr", "expected float, got str 'abc'"),
    p("model.num_layers=true", "model.num_layers", "expected int, got bool True"),
    p("model.num_layers=4.5", "model.num_layers", "expected int, got float"),
    p("model.num_layers=null", "model.num_layers", "expected int, got NoneType"),
    p("model.moe.layer_freq=[1,0,true,0]", "model.moe.layer_freq", "expected int | list[int]"),
    p("parallel.sequence_parallel=1", "parallel.sequence_parallel", "expected bool | None"),
    p("model.moe=3", "model.moe", "expected a mapping"),
    # keys and override syntax
    p("model.moe.topk_x=3", "model.moe.topk_x", "unknown key (did you mean 'topk'?)"),
    p("modle.num_layers=3", "modle", "did you mean 'model'?"),
    p("model.zzz=3", "model.zzz", "known keys: family, num_layers"),
    p("model.num_layers.x=1", "model.num_layers", "not a section"),
    p("train.lr", "train.lr", "expected key=value"),
    p("train.lr=[1", "train.lr=[1", "cannot parse"),
]


@pytest.mark.parametrize("overrides, field, fragment", ERRORS)
def test_config_errors(overrides, field, fragment):
    with pytest.raises(ConfigError) as e:
        load_checked(None, overrides)
    message = str(e.value)
    assert field in message and fragment in message, message


def test_error_cases_start_valid():
    """Negative control for ERRORS: the base layouts they perturb are valid without the bad key."""
    load_checked(None, TP2.split())
    load_checked(None, ["parallel.world_size=4", "parallel.expert=4", "model.moe.num_experts=8"])
    load_checked(None, ["parallel.world_size=4", "parallel.tensor=4", "model.num_query_groups=4"])
    load_checked(None, ["parallel.world_size=2", "parallel.pipeline=2",
                        "parallel.virtual_pipeline=2"])


# ---- inputs checked before any rank starts (megamoe.data.checks) ------------------------------

@pytest.fixture(scope="module")
def tokenizer_40(tmp_path_factory) -> str:
    """A sentencepiece model of 40 pieces."""
    from megamoe.data.tokenizer import train_sentencepiece

    prefix = str(tmp_path_factory.mktemp("sp") / "tok")
    text = ["a cab fed a bad face", "dead beef ace cafe bead", "fade deface add decade"] * 20
    tok = train_sentencepiece(text, prefix, 40)
    assert tok.vocab_size == 40
    return tok.path


def _input_error(overrides) -> str | None:
    from megamoe.data.checks import check_inputs

    try:
        check_inputs(load_config(None, overrides))
    except ConfigError as exc:
        return str(exc)
    return None


def test_missing_inputs_are_refused_naming_field_and_path(tmp_path, tokenizer_40):
    prefix = tmp_path / "corpus"
    (tmp_path / "corpus.idx").write_bytes(b"")
    indexed = ["data.kind=indexed", f"data.path={prefix}"]
    assert _input_error(indexed).startswith(f"data.path: {prefix}.bin: no such file")
    (tmp_path / "corpus.bin").write_bytes(b"")
    assert _input_error(indexed) is None              # both files: the reader checks the rest
    missing_tok = tmp_path / "nope.model"
    assert _input_error([*indexed, f"data.tokenizer={missing_tok}"]).startswith(
        f"data.tokenizer: {missing_tok}: no such file")
    assert _input_error([f"train.resume={tmp_path / 'gone'}"]).startswith(
        f"train.resume: {tmp_path / 'gone'}: no such file or directory")
    assert _input_error([f"train.resume={tmp_path}"]) is None
    assert _input_error(["train.resume=none"]) is None


def test_model_vocab_size_below_the_datas_is_refused(tmp_path, tokenizer_40):
    (tmp_path / "c.bin").write_bytes(b"")
    (tmp_path / "c.idx").write_bytes(b"")
    indexed = ["data.kind=indexed", f"data.path={tmp_path / 'c'}", f"data.tokenizer={tokenizer_40}"]
    msg = _input_error([*indexed, "model.vocab_size=39"])
    assert msg.startswith("model.vocab_size: 39 is smaller than the data's vocabulary (40, "
                          "data.tokenizer)"), msg
    assert _input_error([*indexed, "model.vocab_size=40"]) is None
    assert _input_error([*indexed, "model.vocab_size=41"]) is None   # room for more ids: fine
    assert "(64, data.markov_vocab_size)" in _input_error(["model.vocab_size=63"])
