"""`megamoe` command line: train, submit, config, recipes, convert, generate, eval, sample,
specs."""

from __future__ import annotations

import argparse
import os
import sys

from megamoe.commands import error as _error, fast_shutdown

EPILOG = """examples:
  megamoe train --config configs/lm_quickstart.yaml
  megamoe train --config configs/lm_quickstart.yaml --set train.steps=20 --set parallel.expert=4
  megamoe train --config race            # an installed recipe, from any directory
  torchrun --nproc-per-node 8 -m megamoe train --config configs/<recipe>.yaml
"""
TRAIN_KEYS = """every config key with its default, type and meaning: megamoe config
the installed recipes: megamoe recipes
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megamoe", description="Pretrain Mixture-of-Experts models on Megatron-Core.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train", help="train a model from a YAML config",
        description="Train a model. Without a launcher (torchrun, srun, mpirun) megamoe starts "
                    "parallel.world_size local ranks itself: gloo ranks on CPU, one per GPU.",
        epilog=TRAIN_KEYS + "\n" + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", "-c", metavar="YAML",
                       help="config file or installed recipe name (default: built-in "
                            "defaults; see `megamoe recipes` and configs/)")
    train.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.lr=1e-3 (repeatable)")
    train.add_argument("--dry-run", action="store_true",
                       help="validate the config, print it resolved, and exit")
    conv = sub.add_parser(
        "convert", help="convert a checkpoint to a Hugging Face folder, or back",
        description="--to hf SRC OUT: SRC is a run directory, its checkpoints/ root or one step "
                    "directory (saved under any layout); OUT loads with transformers' "
                    "AutoModelForCausalLM as the first family that expresses the model exactly "
                    "(Mixtral; Qwen2-MoE for a gated shared expert; Qwen3-MoE for QK-norm), "
                    "otherwise with megamoe's modeling code copied into OUT "
                    "(model_type megamoe, from_pretrained(OUT, trust_remote_code=True)). "
                    "--from hf SRC OUT: SRC is such a folder; OUT (a new or empty directory, "
                    "see --force) becomes a run directory with a step-0 checkpoint that any "
                    "layout can train from (--set train.resume=...). "
                    "--to diffusers SRC OUT (or --out OUT): a dit run as a diffusers pipeline "
                    "folder (EMA weights), DiffusionPipeline.from_pretrained(OUT, "
                    "trust_remote_code=True).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  megamoe convert --to hf runs/quickstart-20261123-084046 hf/quickstart"
               "\n  megamoe convert --from hf hf/quickstart runs/imported"
               "\n  megamoe convert runs/dit_dit_moe --to diffusers --out pipes/dit_dit_moe")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf", "diffusers"], help="export format")
    direction.add_argument("--from", dest="from_", choices=["hf"], help="import format")
    conv.add_argument("src", help="source (see above)")
    conv.add_argument("out", nargs="?", help="output folder")
    conv.add_argument("--out", dest="out_flag", metavar="OUT", help="output folder (instead of "
                      "the positional OUT)")
    conv.add_argument("--max-shard-size", type=int, default=2**30, metavar="BYTES",
                      help="largest safetensors shard when exporting (default 1 GiB)")
    conv.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="config overrides for the imported model")
    conv.add_argument("--force", action="store_true",
                      help="--from: import into an existing run directory, replacing its "
                           "config.yaml and checkpoints/; --to: export into an existing folder "
                           "that has no config.json (an export keeps the files of OUT that it "
                           "does not write, e.g. a README.md model card, and replaces its own)")
    gen = sub.add_parser(
        "generate", help="generate text with a Mixture-of-Recursions checkpoint",
        description="Cached generation with continuous depth-wise batching (model.mor models; "
                    "export other models with `megamoe convert --to hf` and use transformers). "
                    "SRC is a run directory, its checkpoints/ root or one step directory. "
                    "Runs on one CPU process; prints each completion and a tokens/s line.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  megamoe generate runs/mor-expert --prompt 'Once upon' "
               "--max-new-tokens 32\n  megamoe generate runs/mor-token --prompt-ids '5 9 2' "
               "--prompt-ids '7' --policy sequence")
    gen.add_argument("src", help="checkpoint (see above)")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="a prompt, encoded with the run's data.tokenizer (repeatable)")
    gen.add_argument("--prompt-ids", action="append", default=[], metavar="'ID ID …'",
                     help="a prompt as space-separated token ids (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=32,
                     help="tokens generated per prompt (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default 0)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--batch", type=int, default=8,
                     help="tokens per batched call of the shared block (default 8)")
    gen.add_argument("--policy", choices=("depth", "sequence"), default="depth",
                     help="depth: continuous depth-wise batching; sequence: the baseline")
    ev = sub.add_parser(
        "eval", help="evaluate a run's newest checkpoint on its held-out split",
        description="Load the newest complete checkpoint of RUN (saved under any layout) on one "
                    "CPU process and evaluate it on the validation split of its data config: "
                    "validation loss and perplexity (lm family), top-1 accuracy next to chance "
                    "(vit family; with --capacity, V-MoE's inference-capacity table), held-out "
                    "loss by t and, with --judge, samples judged by a vit classifier (dit family, "
                    "--samples/--steps/--cfg-scale/--seed). Progress "
                    "goes to stderr; the last line of stdout is one JSON object of the figures.",
        epilog="examples:\n  megamoe eval runs/quickstart-20261203-0710 --iters 8\n"
               "  megamoe eval runs/vit_vmoe-20261203-1100 --capacity 1,0.5,0.25,0.1 "
               "--priority none,max\n"
               "  megamoe eval runs/dit_dit_moe-20261203-1800 --judge runs/vit_judge-20261203-1700",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("src", metavar="RUN",
                    help="a run directory, its checkpoints/ root or one step directory")
    ev.add_argument("--iters", type=int, default=None,
                    help="global batches of the validation split (default: train.eval_iters)")
    ev.add_argument("--capacity", default=None, metavar="C1,C2,...",
                    help="V-MoE runs: also evaluate at these inference capacity ratios (> 0)")
    ev.add_argument("--priority", default=None, metavar="MODES",
                    help="with --capacity: Batch Prioritized Routing modes to compare, from "
                         "none, max, sum (default none,max)")
    _add_dit_eval_options(ev)
    _add_sample_parser(sub)
    _add_submit_parser(sub)
    sub.add_parser("specs", help="list the router families with paper, config key, causality",
                   description="List the MoE router families megamoe provides.")
    _add_config_parsers(sub)
    return parser


def _add_dit_eval_options(ev) -> None:
    """`megamoe eval` on a dit run (megamoe.commands.eval_dit)."""
    dit = ev.add_argument_group("dit runs (held-out loss by t; samples judged by a vit classifier)")
    dit.add_argument("--judge", default=None, metavar="RUN",
                     help="a trained configs/vit_judge.yaml run on the same image set: classifies "
                          "the samples, its pooled features give KID/FID")
    dit.add_argument("--samples", type=int, default=None,
                     help="images generated (and validation images compared; default 512)")
    dit.add_argument("--steps", type=int, default=None, help="sampler steps (default 50)")
    dit.add_argument("--cfg-scale", type=float, default=None,
                     help="classifier-free guidance scale (default 1.5)")
    dit.add_argument("--seed", type=int, default=None,
                     help="seed of the held-out draws and the samples' noise (default 0)")
    dit.add_argument("--min-judge-accuracy", type=float, default=None,
                     help="refuse a judge whose own validation accuracy is below this "
                          "(default 0.9: below it the sample accuracy means nothing; lower it "
                          "only for smoke tests)")


def _add_sample_parser(sub) -> None:
    """`megamoe sample`: images from a dit run (megamoe.commands.sample)."""
    sp = sub.add_parser(
        "sample", help="sample class-conditional images from a dit run into a grid PNG",
        description="Load the newest complete checkpoint of RUN (a model.family dit run, saved "
                    "under any layout) on one CPU process and sample one image per label with "
                    "its EMA weights: Euler steps of the flow (rectified_flow runs) or DDPM "
                    "steps, classifier-free guidance, noise fixed by --seed and each image's "
                    "position in --labels. Writes a grid PNG captioned with the classes; a "
                    "progress bar goes to stderr; the last line of stdout is one JSON object "
                    "(path, labels, steps, cfg_scale, seed, seconds).",
        epilog="examples:\n  megamoe sample runs/dit_dit_moe-20261203-1800 --labels 0,3,5 "
               "--steps 50 --cfg-scale 4 --seed 0 --out grid.png\n"
               "  megamoe sample runs/dit_dense-20261203-1800 --labels red_circle,blue_square",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("src", metavar="RUN",
                    help="a run directory, its checkpoints/ root or one step directory")
    sp.add_argument("--labels", default=None, metavar="L1,L2,...",
                    help="one image per label: class indices or names such as red_circle "
                         "(default: every class once)")
    sp.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    sp.add_argument("--cfg-scale", type=float, default=4.0, metavar="S",
                    help="classifier-free guidance scale s ≥ 0: u + s·(c − u); 1 is plain "
                         "conditional sampling (default 4)")
    sp.add_argument("--seed", type=int, default=0,
                    help="noise seed; image i's noise depends on (seed, i) only (default 0)")
    sp.add_argument("--out", default=None, metavar="PNG",
                    help="grid path (default RUN/samples/step_<N>_seed_<K>.png)")


def _add_submit_parser(sub) -> None:
    """`megamoe submit`: validate for the allocation's world size, render slurm/, sbatch."""
    sb = sub.add_parser(
        "submit", help="validate a config and queue it on Slurm (sbatch)",
        description="Check the config at the world size of the allocation (nodes x GPUs per "
                    "node, which sets parallel.world_size; on CPU nodes the config's world size "
                    "spread over the nodes), render slurm/pretrain.sbatch (or the torchrun "
                    "template) and queue it; prints the job id, its log and run directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  megamoe submit --config quickstart --nodes 4 --gpus-per-node 8 "
               "--set train.global_batch_size=64 --dry-run\n"
               "  megamoe submit --config configs/race.yaml --nodes 2 "
               "--partition gpu --time 12:00:00 --set train.steps=5000")
    sb.add_argument("--config", "-c", metavar="YAML", required=True,
                    help="config file or installed recipe name")
    sb.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    sb.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                    help="GPUs (and ranks) per node; 0: CPU ranks (default)")
    sb.add_argument("--tasks-per-node", type=int, default=None, metavar="T",
                    help="CPU ranks per node (default: parallel.world_size / nodes)")
    sb.add_argument("--partition", "-p", help="Slurm partition")
    sb.add_argument("--time", "-t", help="time limit, e.g. 24:00:00 (default)")
    sb.add_argument("--launcher", choices=("srun", "torchrun"), default="srun",
                    help="srun: one task per GPU; torchrun: one task per node running torchrun")
    sb.add_argument("--min-free-disk-gb", type=float, default=None, metavar="GB",
                    help="health check: free disk under runs/ on every node (default 10)")
    sb.add_argument("--min-free-mem-gb", type=float, default=None, metavar="GB",
                    help="health check: available memory on every node (default 4)")
    sb.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config field (repeatable)")
    sb.add_argument("--dry-run", action="store_true",
                    help="validate and print the job script instead of queueing it")


def cmd_submit(args) -> int:
    from megamoe.commands.submit import Request, submit
    from megamoe.config import ConfigError

    req = Request(args.config, args.nodes, args.gpus_per_node, args.tasks_per_node,
                  args.partition, args.time, args.overrides, args.launcher,
                  args.min_free_disk_gb, args.min_free_mem_gb)
    try:
        return submit(req, dry_run=args.dry_run)
    except (ConfigError, ValueError) as exc:
        return _error(str(exc))


def _add_config_parsers(sub) -> None:
    """`megamoe config` (every key, its default, type and help) and `megamoe recipes`."""
    cfg = sub.add_parser(
        "config", help="list every config key with its default, type and help",
        description="Every config key (as --set takes it) with its default, type and help. "
                    "With --config/--set: the values of that config, '*' marking those that "
                    "differ from the default.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  megamoe config\n  megamoe config model.moe\n"
               "  megamoe config --config race --changed")
    cfg.add_argument("prefix", nargs="?", default="",
                     help="show only keys starting with this, e.g. train or model.moe.vmoe")
    cfg.add_argument("--config", "-c", metavar="YAML",
                     help="config file or recipe name to show resolved")
    cfg.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config field (repeatable)")
    cfg.add_argument("--changed", action="store_true",
                     help="only the keys whose value differs from the default")
    sub.add_parser("recipes", help="list the installed recipes (megamoe train --config NAME)",
                   description="The recipes installed with megamoe, by name; "
                               "`megamoe train --config NAME` trains one from any directory.")


def version_line() -> str:
    """megamoe's version and those of torch and megatron-core, without importing them."""
    from importlib import metadata

    from megamoe import __version__

    def installed(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"megamoe {__version__} (torch {installed('torch')}, "
            f"megatron-core {installed('megatron-core')})")


def cmd_specs() -> int:
    from megamoe.moe.routers import ROUTERS

    from megamoe.mor.expert_choice import ExpertChoiceDepthRouter
    from megamoe.mor.token_choice import TokenChoiceDepthRouter

    print(f"{'config key (model.moe.router)':32} {'causal':8} {'selects over':38} paper")
    for key, cls in ROUTERS.items():
        causal = "yes" if cls.causal else "no"
        print(f"{key:32} {causal:8} {' | '.join(cls.selection_groups):38} {cls.paper}")
    print("\nselects over: each token alone (token), each sample (sequence), the micro-batch, or "
          "micro-batch m of every data-parallel rank together (data-parallel); default first.")
    for key, cls in ROUTERS.items():
        if cls.selection_option:
            print(f"{key}: {cls.selection_option} picks the group.")
    print("topk and dit_moe are causal unless model.moe.capacity_factor is set (capacity "
          "dropping competes across the micro-batch).")
    print("vmoe and limoe are causal when model.moe.vmoe.capacity_ratio and "
          "eval_capacity_ratio are null (no capacity, no batch priority).")
    print(f"MoR depth routers (model.mor.router): expert selects over "
          f"{' | '.join(ExpertChoiceDepthRouter.selection_groups)}, token over "
          f"{' | '.join(TokenChoiceDepthRouter.selection_groups)}.")
    return 0


def cmd_config(args) -> int:
    from megamoe.config import ConfigError, load_config
    from megamoe.config.listing import format_sections, sections

    resolved = bool(args.config or args.overrides)
    try:
        secs = sections(load_config(args.config, args.overrides) if resolved else None)
    except ConfigError as exc:
        return _error(str(exc))
    for sec in secs:
        sec.rows = [r for r in sec.rows if r.key.startswith(args.prefix)]
    if not any(sec.rows for sec in secs):
        return _error(f"no config key starts with {args.prefix!r} (sections: "
                      f"{', '.join(s.path for s in sections())})")
    for sec in secs:
        sec.rows = [r for r in sec.rows if not (args.changed and r.value == r.default)]
    secs = [s for s in secs if s.rows]
    if not secs:
        print("every key has its default value")
        return 0
    print(format_sections(secs, resolved))
    if resolved:
        print("\n(*: the value differs from its default)")
    return 0


def cmd_recipes() -> int:
    from megamoe.config.recipes import RECIPE_DIR, describe, recipe_names

    names = recipe_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:{width}}  {describe(name)}")
    print(f"\n{len(names)} recipes in {os.path.realpath(RECIPE_DIR)}; train one with "
          f"`megamoe train --config NAME`, see its keys with `megamoe config --config NAME`")
    return 0


def _user_errors(run) -> int:
    """`run()`; a user's error (ValueError, CheckpointError among them, or ConfigError): one
    line, exit code 2."""
    from megamoe.config import ConfigError

    try:
        run()
    except (ValueError, ConfigError) as exc:
        return _error(str(exc))
    return 0


def cmd_convert(args) -> int:
    from megamoe.commands import convert

    if (args.out is None) == (args.out_flag is None):
        return _error("convert: give the output folder once (OUT or --out OUT)")
    out = args.out or args.out_flag
    if args.to == "diffusers":
        return _user_errors(lambda: convert.to_diffusers(args.src, out, force=args.force))
    if args.to:
        return _user_errors(lambda: convert.to_hf(
            args.src, out, max_shard_bytes=args.max_shard_size, force=args.force))
    return _user_errors(lambda: convert.from_hf(args.src, out, args.overrides, force=args.force))


def cmd_eval(args) -> int:
    def run():
        from megamoe.commands.eval import evaluate_checkpoint

        evaluate_checkpoint(args.src, iters=args.iters, capacity=args.capacity,
                            priority=args.priority, judge=args.judge, samples=args.samples,
                            steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                            min_judge_accuracy=args.min_judge_accuracy)
    return _user_errors(run)


def cmd_sample(args) -> int:
    def run():
        from megamoe.commands.sample import sample_checkpoint

        sample_checkpoint(args.src, labels=args.labels, steps=args.steps,
                          cfg_scale=args.cfg_scale, seed=args.seed, out=args.out)
    return _user_errors(run)


def cmd_generate(args) -> int:
    def run():
        from megamoe.commands.generate import generate_from_checkpoint

        generate_from_checkpoint(args.src, texts=args.prompt, id_prompts=args.prompt_ids,
                                 max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed,
                                 max_batch=args.batch, policy=args.policy)
    return _user_errors(run)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)   # before any heavy import: --help and --version stay fast
    if args.command is None:
        parser.print_help(sys.stderr)
        return _error("a command is required (train, submit, config, recipes, specs, "
                      "convert, generate, eval, sample)")
    if args.command == "config":
        return cmd_config(args)
    if args.command == "recipes":
        return cmd_recipes()
    from megamoe.platform.bridge import quiet_megatron_warnings

    quiet_megatron_warnings()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:   # Ctrl-C before the ranks start (they handle it after)
        print("megamoe: interrupted", file=sys.stderr)
        return 130
    finally:
        fast_shutdown()


def _dispatch(args) -> int:
    if args.command == "train":
        from megamoe.commands.train import cmd_train

        return cmd_train(args)
    if args.command == "specs":
        return cmd_specs()
    if args.command == "submit":
        return cmd_submit(args)
    if args.command == "convert":
        return cmd_convert(args)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "sample":
        return cmd_sample(args)
    assert args.command == "generate", args.command
    return cmd_generate(args)
