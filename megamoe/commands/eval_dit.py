"""`megamoe eval` for the dit family (issue 15, item 7): what the diffusion model learned, with
its EMA weights (the ones sampling uses).

- `loss_by_t`: the held-out denoising loss at fixed (x, ε, t) in 8 bins of the noise level
  (σ for rectified flow — the flow-matching loss ‖v̂ − (ε − x)‖²; t/T for DDPM — the ε loss),
  bin 0 nearly clean, bin 7 nearly noise. Every validation image is evaluated in every bin:
  its ε and its position inside each bin come from one generator seeded by (--seed, image
  index) (`eval_draws`), so every checkpoint and recipe sees the same (x, ε, t).
- with `--judge RUN` (a trained configs/vit_judge.yaml run; megamoe.commands.dit_judge):
  `--samples` images generated with `--steps` and `--cfg-scale` (labels cycling through the
  classes, noise from --seed and the image's position), their class accuracy under the judge
  next to chance and next to the judge's own validation accuracy, and KID / FID of the
  samples against as many validation images in the judge's pooled feature space;
- the per-layer expert load against the sampler's t (every step's routed tokens, conditional
  and unconditional halves together) as a PNG next to the checkpoints and in TensorBoard;
  for DiffMoE and Race also the active expert compute at inference relative to training,
  against t (DiffMoE: `router.active_compute()`; Race: routed assignments / (tokens · k)).

Progress bars go to stderr; the last line of stdout is one JSON object of every figure.

Shapes: B images, C channels, H, W sides, L MoE layers, E experts, T sampler steps.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

T_BINS = 8
EVAL_STREAM = 0xE7A1     # keeps these draws apart from training's and sampling's
SAMPLE_BATCH = 64        # images per sampler call (positions keep the noise batch-free)


def _bar(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"[megamoe] {what}", file=sys.stderr, leave=False,
                dynamic_ncols=True)


def eval_draws(seed: int, index: int, shape_CHW: tuple, bins: int = T_BINS) -> tuple:
    """(ε [C, H, W] float32, noise level per bin [bins] in [0, 1]) of validation image `index`:
    level_b = (b + u_b) / bins with u_b ~ U[0, 1) — one draw inside every bin."""
    rng = np.random.default_rng([seed, EVAL_STREAM, index])
    eps = rng.standard_normal(shape_CHW, dtype=np.float32)
    return eps, (np.arange(bins) + rng.random(bins)) / bins


def noised_at(x_BCHW: torch.Tensor, eps_BCHW: torch.Tensor, level_B: torch.Tensor, dit):
    """(x_t, target, model timesteps) at noise level `level` in [0, 1]: σ for rectified flow
    (x_t = (1 − σ)x + σε, v = ε − x, timestep σ·T), t = ⌊level·T⌋ for DDPM (target ε)."""
    T = dit.num_train_timesteps
    if dit.objective == "rectified_flow":
        s = level_B.float()[:, None, None, None]
        return (1 - s) * x_BCHW + s * eps_BCHW, eps_BCHW - x_BCHW, level_B.float() * T
    from megamoe.models.dit.objective import ddpm_alphas_cumprod

    t_B = (level_B * T).long().clamp(max=T - 1)
    alpha_bar = ddpm_alphas_cumprod(T, dit.beta_start, dit.beta_end)[t_B][:, None, None, None]
    return alpha_bar.sqrt() * x_BCHW + (1 - alpha_bar).sqrt() * eps_BCHW, eps_BCHW, t_B.float()


@torch.no_grad()
def loss_by_t(chunks, cfg, images_BCHW, labels_B, index_B, *, seed: int, batch: int = 64,
              bar=None) -> list[float]:
    """The mean per-image denoising loss [bins] of uint8 `images` (labels kept: conditional)
    in each noise-level bin, with the EMA weights (module docstring)."""
    from megamoe.models.dit.ema import ema_weights
    from megamoe.models.dit.model import predict
    from megamoe.models.dit.objective import images_to_unit

    dit = cfg.model.dit
    x_BCHW = images_to_unit(torch.as_tensor(images_BCHW))
    draws = [eval_draws(seed, int(i), tuple(x_BCHW.shape[1:])) for i in index_B]
    eps_BCHW = torch.from_numpy(np.stack([d[0] for d in draws]))
    level_BK = torch.from_numpy(np.stack([d[1] for d in draws]))
    sums = torch.zeros(T_BINS, dtype=torch.float64)
    with ema_weights(chunks):
        for k in range(T_BINS):
            for start in range(0, x_BCHW.shape[0], batch):
                part = slice(start, start + batch)
                x_t, target, timesteps = noised_at(x_BCHW[part], eps_BCHW[part],
                                                   level_BK[part, k], dit)
                pred = predict(chunks, x_t, timesteps, torch.as_tensor(labels_B[part]))
                sums[k] += ((pred.float() - target) ** 2).mean(dim=(1, 2, 3)).double().sum()
                if bar is not None:
                    bar.update(1)
    return (sums / x_BCHW.shape[0]).tolist()


class LoadByStep:
    """The sampler's `on_step`: per step index, the [L, E] routed tokens of the MoE layers and
    the tokens they saw, plus DiffMoE's `active_compute` (a token-weighted mean over the
    sampler's calls)."""

    def __init__(self, chunks, cfg):
        from megamoe.models.lm.model import moe_layers

        self.layers = moe_layers(chunks)
        self.cfg, self.t = cfg, {}
        self.load, self.tokens, self.diffmoe = {}, {}, {}
        self._read()          # drop what earlier forwards (the t-bin losses) counted

    def _read(self) -> tuple:
        """([L, E] routed tokens, [L] DiffMoE active compute or None) since the last read."""
        load_LE = torch.stack([layer.tokens_per_expert_acc.double().cpu()
                               for layer in self.layers])
        active = []
        for layer in self.layers:
            layer.tokens_per_expert_acc.zero_()
            got = (layer.router.active_compute(reset=True)
                   if hasattr(layer.router, "active_compute") else None)
            active.append(None if got is None else got["relative_to_training"])
        return load_LE, active

    def __call__(self, i: int, timestep: float, x_BCHW: torch.Tensor, guided: bool) -> None:
        from megamoe.config.diffusion import dit_tokens

        load_LE, active = self._read()
        self.t[i] = timestep
        self.load[i] = self.load.get(i, 0) + load_LE
        tokens = x_BCHW.shape[0] * (2 if guided else 1) * dit_tokens(self.cfg)
        self.tokens[i] = self.tokens.get(i, 0) + tokens
        if all(a is not None for a in active):
            acc = self.diffmoe.setdefault(i, [torch.zeros(len(active), dtype=torch.float64), 0])
            acc[0] += torch.tensor(active, dtype=torch.float64) * tokens
            acc[1] += tokens

    def figures(self) -> dict:
        """{t: [steps], share: [steps][L][E] (each layer's routed share per expert), active:
        [steps][L] relative to training (DiffMoE and Race only)}."""
        if not self.layers or not self.load:
            return {}
        steps = sorted(self.load)
        share = [(self.load[i] / self.load[i].sum(dim=1, keepdim=True).clamp(min=1)).tolist()
                 for i in steps]
        out = {"t": [self.t[i] for i in steps], "layers": [m.layer_number for m in self.layers],
               "share": share}
        router, k = self.cfg.model.moe.router, self.cfg.model.moe.topk
        if router == "diffmoe" and self.diffmoe:
            out["active"] = [(self.diffmoe[i][0] / self.diffmoe[i][1]).tolist() for i in steps]
        elif router == "race":
            out["active"] = [(self.load[i].sum(dim=1) / (self.tokens[i] * k)).tolist()
                             for i in steps]
        return out


def generate(chunks, cfg, n: int, *, steps: int, cfg_scale: float, seed: int,
             recorder: LoadByStep | None = None) -> tuple:
    """(images [n, C, H, W] uint8, labels [n]): labels cycle through the classes; image i's
    noise is a function of (seed, i), so the batches do not matter."""
    from megamoe.commands.dit_judge import to_uint8
    from megamoe.models.dit.sample import sample_images

    labels = torch.arange(n) % cfg.data.num_classes
    guided = cfg_scale != 1.0
    on_step = (lambda i, t, x: recorder(i, t, x, guided)) if recorder is not None else None
    out = []
    bar = _bar(n * steps, f"sampling {n} images x {steps} steps")
    try:
        for start in range(0, n, SAMPLE_BATCH):
            positions = list(range(start, min(n, start + SAMPLE_BATCH)))
            out.append(to_uint8(sample_images(
                chunks, cfg, labels[positions], steps=steps, cfg_scale=cfg_scale, seed=seed,
                positions_B=positions, on_step=on_step,
                progress=lambda order, b=len(positions): _counting(order, bar, b))))
    finally:
        bar.close()
    return torch.cat(out), labels


def _counting(order, bar, images: int):
    """The sampler's step iterable, advancing `bar` by the batch's images after each step."""
    for i in order:
        yield i
        bar.update(images)


def load_figure(load: dict, title: str):
    """One panel per MoE layer: experts' routed share (colour) against the sampler's t, and for
    DiffMoE / Race the active compute relative to training (white line, right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share_SLE = np.asarray(load["share"])
    t_S = np.asarray(load["t"])
    L = share_SLE.shape[1]
    fig, axes = plt.subplots(1, L, figsize=(1.5 + 2.6 * L, 2.8), squeeze=False,
                             constrained_layout=True)
    for n, ax in enumerate(axes[0]):
        im = ax.imshow(share_SLE[:, n, :].T, aspect="auto", origin="lower", cmap="viridis",
                       vmin=0, extent=(0, len(t_S), -0.5, share_SLE.shape[2] - 0.5))
        ticks = np.linspace(0, len(t_S) - 1, min(5, len(t_S))).astype(int)
        ax.set_xticks(ticks + 0.5, [f"{t_S[i]:.0f}" for i in ticks], fontsize=7)
        ax.set_xlabel("sampler t (noise → clean)", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.set_title(f"layer {load['layers'][n]}", fontsize=9)
        if "active" in load:
            twin = ax.twinx()
            twin.plot(np.arange(len(t_S)) + 0.5, np.asarray(load["active"])[:, n], color="w",
                      lw=1.5)
            twin.set_ylim(0, max(2.0, float(np.max(load["active"])) * 1.1))
            twin.set_ylabel("active / training", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="routed share")
    fig.suptitle(title, fontsize=10)
    return fig


def write_load(load: dict, run_dir: str, step: int, log) -> str | None:
    """The figure as `<run>/eval/expert_load_vs_t_step_<N>.png` and under `eval/expert_load_vs_t`
    in the run's TensorBoard (with `eval/active_compute/layer_<l>` scalars against the step
    index); returns the PNG's path (None without MoE layers)."""
    if not load:
        return None
    fig = load_figure(load, f"expert load against t while sampling (step {step})")
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    path = os.path.join(run_dir, "eval", f"expert_load_vs_t_step_{step:07d}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    writer.add_figure("eval/expert_load_vs_t", fig, global_step=step)
    for s, row in enumerate(load.get("active", [])):
        for n, value in enumerate(row):
            writer.add_scalar(f"eval/active_compute/layer_{load['layers'][n]}", value, s)
    writer.close()
    log(f"[megamoe] expert load against t: {path} (and TensorBoard eval/expert_load_vs_t)")
    return path


def check_options(samples: int, steps: int, cfg_scale: float, min_judge_accuracy: float) -> None:
    """ValueError naming the flag for values the evaluation cannot use."""
    if samples < 4:
        raise ValueError(f"--samples={samples}: must be ≥ 4 (KID and FID compare sets)")
    if steps < 1:
        raise ValueError(f"--steps={steps}: must be ≥ 1")
    if not cfg_scale >= 0:
        raise ValueError(f"--cfg-scale={cfg_scale}: must be ≥ 0")
    if not 0 <= min_judge_accuracy <= 1:
        raise ValueError(f"--min-judge-accuracy={min_judge_accuracy}: must be in [0, 1]")


def _rounded(value, digits: int = 5):
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return round(float(value), digits)


def evaluate_dit(engine, cfg, step_dir: str, meta: dict, *, judge: str | None = None,
                 samples: int = 512, steps: int = 50, cfg_scale: float = 1.5, seed: int = 0,
                 min_judge_accuracy: float = 0.9, log=print) -> dict:
    """Every figure of the module docstring for the loaded dit checkpoint; the judge is
    loaded (and refused) before any other work."""
    from megamoe.commands.dit_judge import kid_fid, load_judge
    from megamoe.models.registry import family_datasets

    check_options(samples, steps, cfg_scale, min_judge_accuracy)
    err = (lambda m: print(m, file=sys.stderr, flush=True))
    extractor = None
    figures = {"checkpoint": step_dir, "step": int(meta["step"]), "family": "dit",
               "objective": cfg.model.dit.objective, "router": (cfg.model.moe.router if
                                                               cfg.model.moe.num_experts else
                                                               "dense")}
    if judge is not None:
        extractor, figures["judge_accuracy"], figures["judge_images"] = load_judge(
            judge, cfg, min_judge_accuracy, log=err)
        figures["judge"] = judge
    _, valid, _ = family_datasets(cfg)
    n_real = min(samples, len(valid))
    real_np, real_labels = valid.get_batch(np.arange(n_real))
    real_BCHW = torch.as_tensor(np.asarray(real_np))
    chunks = engine.modules
    bar = _bar(T_BINS * -(-n_real // 64), f"held-out loss in {T_BINS} t-bins")
    try:
        losses = loss_by_t(chunks, cfg, real_BCHW, torch.as_tensor(np.asarray(real_labels)),
                           range(n_real), seed=seed, bar=bar)
    finally:
        bar.close()
    figures.update({"loss_by_t": _rounded(losses, 6), "loss_mean": float(np.mean(losses)),
                    "t_bins": [k / T_BINS for k in range(T_BINS + 1)],
                    "loss_images": n_real, "seed": seed})
    log(f"[megamoe] held-out {figures['objective']} loss by noise level (EMA weights, "
        f"{n_real} validation images): " + ", ".join(
            f"[{k / T_BINS:.3f},{(k + 1) / T_BINS:.3f}) {v:.4f}" for k, v in enumerate(losses)))
    recorder = LoadByStep(chunks, cfg) if cfg.model.moe.num_experts else None
    fake_BCHW, fake_labels = generate(chunks, cfg, samples, steps=steps, cfg_scale=cfg_scale,
                                      seed=seed, recorder=recorder)
    figures.update({"samples": samples, "steps": steps, "cfg_scale": cfg_scale,
                    "chance": 1.0 / cfg.data.num_classes})
    if extractor is not None:
        _, logits = extractor.features_and_logits(fake_BCHW)
        figures["sample_accuracy"] = (logits.argmax(-1) == fake_labels).float().mean().item()
        figures.update(kid_fid(extractor, real_BCHW, fake_BCHW, seed=seed))
        log(f"[megamoe] {samples} samples ({steps} steps, CFG {cfg_scale:g}, seed {seed}): "
            f"judged class accuracy {figures['sample_accuracy']:.4f} (chance "
            f"{figures['chance']:.4f}; the judge on real images {figures['judge_accuracy']:.4f}); "
            f"KID {figures['kid']:.5f} ± {figures['kid_std']:.5f} (subsets of "
            f"{figures['kid_subset_size']}), FID {figures['fid']:.3f} in the judge's "
            f"{figures['feature_dims']}-dim features")
    load = recorder.figures() if recorder is not None else {}
    if load:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
        figures["expert_load_png"] = write_load(load, run_dir, figures["step"], log)
        figures["expert_load_by_t"] = {"t": _rounded(load["t"], 3), "layers": load["layers"],
                                       "share": _rounded(load["share"], 4)}
        if "active" in load:
            figures["active_compute_by_t"] = _rounded(load["active"], 4)
            figures["active_compute_mean"] = float(np.mean(load["active"]))
            log(f"[megamoe] active expert compute at inference / training (mean over steps "
                f"and layers): {figures['active_compute_mean']:.4f}")
    return figures
