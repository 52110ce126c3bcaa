#!/usr/bin/env python
"""The dit recipes side by side (issue 15, item 8): each of the six diffusion recipes that
exists in configs/ is trained with the same budget (or its existing run is read), evaluated by
`megamoe eval --judge` with one judge, and tabulated: held-out loss per noise-level bin, the
judged class accuracy of the samples, KID / FID in the judge's feature space, and DiffMoE's /
Race's active compute at inference. Recipes that do not exist yet are listed as missing.

Runs live under --runs-dir/<recipe> (the judge under --runs-dir/vit_judge unless --judge names
a trained one). A run whose newest checkpoint is at the budget's step is not trained again;
an evaluation whose settings match the one saved in <run>/eval/dit_table.json is read back.
The tool reports what each recipe gives here; it asserts no direction (the papers' claims:
DiffMoE below dense at equal active parameters; Race ≤ DiT-MoE). The last line is JSON.

examples:
  python tools/dit_table.py                      # the integrator's run: recipes' own budgets
  python tools/dit_table.py --steps 2 --judge-steps 2 --samples 16 --eval-steps 3 \\
      --min-judge-accuracy 0 --set parallel.world_size=1 --set parallel.expert=1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (label in the table, recipe name under configs/): the issue's six, in its order
RECIPES = (("dense DiT", "dit_dense"), ("DiT-MoE", "dit_dit_moe"), ("DiffMoE", "dit_diffmoe"),
           ("Race-DiT", "dit_race"), ("EC-DiT", "dit_ec_dit"), ("Diff-MoE", "dit_diff_moe"))
JUDGE_RECIPE = "vit_judge"
EVAL_FILE = os.path.join("eval", "dit_table.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("examples:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default="runs/dit_table", help="where the runs are (made)")
    p.add_argument("--only", default=None, metavar="R1,R2",
                   help="these recipe names only (default: every one of the six that exists)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every recipe (default: the recipes' train.steps, "
                        "which must then agree)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override for every dit recipe (e.g. parallel.world_size=1)")
    p.add_argument("--judge", default=None, metavar="RUN",
                   help="a trained vit_judge run (default: train configs/vit_judge.yaml under "
                        "--runs-dir/vit_judge)")
    p.add_argument("--judge-steps", type=int, default=None,
                   help="training steps of the judge trained here (default: its recipe's)")
    p.add_argument("--judge-set", action="append", default=[], dest="judge_overrides",
                   metavar="KEY=VALUE", help="override for the judge trained here")
    p.add_argument("--samples", type=int, default=512, help="generated images per recipe")
    p.add_argument("--eval-steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale (default 1.5)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    p.add_argument("--min-judge-accuracy", type=float, default=0.9,
                   help="refuse a weaker judge (default 0.9; lower only for smoke tests)")
    return p.parse_args(argv)


def megamoe(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a child process (each run and evaluation loads its own model)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megamoe", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def run_step(run_dir: str) -> int | None:
    """The newest complete checkpoint's step of `run_dir`, None without one."""
    from megamoe.checkpoint.load import read_meta, resolve

    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return None
    step_dir = resolve(run_dir, log=lambda _: None)
    return None if step_dir is None else int(read_meta(step_dir)["step"])


def budget(recipe: str, steps: int | None, overrides: list) -> int:
    from megamoe.config import load_config
    from megamoe.config.recipes import recipe_path

    return steps or load_config(recipe_path(recipe), overrides).train.steps


def images_per_step(recipe: str, overrides: list) -> tuple:
    """(global batch, image side, patch): what makes two budgets the same tokens."""
    from megamoe.config import load_config
    from megamoe.config.recipes import recipe_path

    cfg = load_config(recipe_path(recipe), overrides)
    return cfg.train.global_batch_size, cfg.data.image_size, cfg.model.dit.patch_size


def train(recipe: str, run_dir: str, steps: int, overrides: list, log) -> None:
    """Train (or resume) `recipe` to `steps` in `run_dir` unless it is there; SystemExit with
    the run's last lines when training fails."""
    if run_step(run_dir) == steps:
        log(f"[dit_table] {recipe}: read {run_dir} (step {steps})")
        return
    log(f"[dit_table] {recipe}: training {steps} steps into {run_dir}")
    sets = [a for o in [*overrides, f"train.steps={steps}", f"run.dir={run_dir}"]
            for a in ("--set", o)]
    out = megamoe("train", "--config", f"configs/{recipe}.yaml", *sets)
    if out.returncode != 0:
        raise SystemExit(f"[dit_table] {recipe}: training failed:\n{out.stderr[-2000:]}")


def evaluate(recipe: str, run_dir: str, judge: str, args, log) -> dict:
    """`megamoe eval` figures of the run (read back when saved with the same settings)."""
    settings = {"judge": os.path.abspath(judge), "step": run_step(run_dir),
                "samples": args.samples, "steps": args.eval_steps, "cfg_scale": args.cfg_scale,
                "seed": args.seed}
    path = os.path.join(run_dir, EVAL_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("settings") == settings:
            log(f"[dit_table] {recipe}: read {path}")
            return saved["figures"]
    log(f"[dit_table] {recipe}: evaluating ({args.samples} samples, {args.eval_steps} steps)")
    out = megamoe("eval", run_dir, "--judge", judge, "--samples", str(args.samples),
                  "--steps", str(args.eval_steps), "--cfg-scale", str(args.cfg_scale),
                  "--seed", str(args.seed), "--min-judge-accuracy", str(args.min_judge_accuracy))
    if out.returncode != 0:
        raise SystemExit(f"[dit_table] {recipe}: evaluation failed:\n{out.stderr[-2000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"settings": settings, "figures": figures}, f)
    return figures


def row_of(label: str, recipe: str, run_dir: str, figures: dict) -> dict:
    summary = {}
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    keep = ("step", "loss_by_t", "loss_mean", "sample_accuracy", "chance", "kid", "kid_std",
            "fid", "judge_accuracy", "active_compute_mean", "router")
    return {"label": label, "recipe": recipe, "run": run_dir,
            "train_wall_s": summary.get("wall_s"), "layout": summary.get("layout"),
            "parameters_active": summary.get("parameters_active"),
            "parameters_total": summary.get("parameters_total"),
            "val_loss": summary.get("val_loss"),
            **{k: figures.get(k) for k in keep}}


def table(rows: list[dict]) -> str:
    """The rows as aligned text: one line per recipe."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'recipe':<10} {'step':>5} {'active':>8} {'loss':>7}  "
            + " ".join(f"t{k}" .rjust(6) for k in range(8))
            + f" {'acc':>6} {'KID':>8} {'FID':>8} {'compute':>7} {'train_s':>7}")
    lines = [head]
    for r in rows:
        bins = r["loss_by_t"] or [None] * 8
        lines.append(f"{r['label']:<10} {num(r['step'], 'd'):>5} "
                     f"{num(r['parameters_active'], ','):>8} {num(r['loss_mean'], '.4f'):>7}  "
                     + " ".join(num(v, '.4f').rjust(6) for v in bins)
                     + f" {num(r['sample_accuracy'], '.3f'):>6} {num(r['kid'], '.5f'):>8} "
                     f"{num(r['fid'], '.3f'):>8} {num(r['active_compute_mean'], '.3f'):>7} "
                     f"{num(r['train_wall_s'], '.0f'):>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from megamoe.config.recipes import recipe_names

    args = parse_args(argv)
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    wanted = args.only.split(",") if args.only else [r for _, r in RECIPES]
    existing = set(recipe_names())
    chosen = [(label, r) for label, r in RECIPES if r in wanted and r in existing]
    missing = [r for _, r in RECIPES if r in wanted and r not in existing]
    unknown = [r for r in wanted if r not in dict((r, l) for l, r in RECIPES)]
    if unknown:
        raise SystemExit(f"--only: {unknown} are not dit table recipes "
                         f"({', '.join(r for _, r in RECIPES)})")
    if missing:
        log(f"[dit_table] recipes missing from configs/: {', '.join(missing)}")
    steps = {r: budget(r, args.steps, args.overrides) for _, r in chosen}
    if len(set(steps.values())) > 1:
        raise SystemExit(f"--steps: the recipes' budgets differ ({steps}); give one budget")
    images = {r: images_per_step(r, args.overrides) for _, r in chosen}
    if len(set(images.values())) > 1:
        raise SystemExit(f"the recipes' images per step differ ({images}): set "
                         "train.global_batch_size with --set for all")
    judge = args.judge
    if judge is None:
        judge = os.path.join(args.runs_dir, JUDGE_RECIPE)
        train(JUDGE_RECIPE, judge, budget(JUDGE_RECIPE, args.judge_steps, args.judge_overrides),
              args.judge_overrides, log)
    rows = []
    for label, recipe in chosen:
        run_dir = os.path.join(args.runs_dir, recipe)
        train(recipe, run_dir, steps[recipe], args.overrides, log)
        rows.append(row_of(label, recipe, run_dir, evaluate(recipe, run_dir, judge, args, log)))
    batch = next(iter(images.values()), (0, 0, 0))
    print(f"dit recipes, {next(iter(steps.values()), 0)} steps of {batch[0]} images each "
          f"({batch[1]}x{batch[1]}, patch {batch[2]}); samples {args.samples}, "
          f"{args.eval_steps} sampler steps, CFG {args.cfg_scale:g}, judge {judge}")
    print("loss: held-out denoising loss (t0 nearly clean … t7 nearly noise); acc: judged "
          "class accuracy of the samples; compute: active/training (DiffMoE, Race)")
    print(table(rows))
    print(json.dumps({"tool": "dit_table", "steps": next(iter(steps.values()), None),
                      "images_per_step": batch[0],
                      "judge": judge, "samples": args.samples, "eval_steps": args.eval_steps,
                      "cfg_scale": args.cfg_scale, "seed": args.seed, "missing": missing,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
