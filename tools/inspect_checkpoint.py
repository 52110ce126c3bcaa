#!/usr/bin/env python
"""Show what a megamoe checkpoint holds: step, layout it was saved under, tensors with global
shapes and sizes, and the parallel layouts it can be loaded into (checkpoints reshard: any layout
the model's config admits).

  python tools/inspect_checkpoint.py runs/quickstart-20261123-084046
  python tools/inspect_checkpoint.py runs/…/checkpoints/step_0000100 --tensors --max-world 16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory, checkpoints/ root or step directory")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--max-world", type=int, default=8,
                   help="largest world size to list loadable layouts for (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    return p.parse_args(argv)


def tensor_table(step_dir: str) -> list[tuple[str, tuple, int]]:
    """(key, global shape, bytes) of every tensor in the checkpoint's storage metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(step_dir).read_metadata()
    rows = []
    for key, md in sorted(meta.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for d in md.size:
                numel *= d
            rows.append((key, tuple(md.size), numel * md.properties.dtype.itemsize))
    return rows


def loadable_layouts(cfg, max_world: int) -> list[dict]:
    """Every (world, TP, PP, EP) the config validates with, expert-TP 1 (also the CPU rule)."""
    from megamoe.config import ConfigError, validate
    from megamoe.models.checks import check_config
    from megamoe.parallel import ParallelDims

    layouts = []
    for world, tp, pp, ep in itertools.product(range(1, max_world + 1), repeat=4):
        if world % (tp * pp) or world % (ep * pp):
            continue
        p = cfg.parallel
        saved = (p.world_size, p.tensor, p.pipeline, p.expert, p.expert_tensor,
                 p.virtual_pipeline, cfg.train.global_batch_size)
        p.world_size, p.tensor, p.pipeline, p.expert = world, tp, pp, ep
        p.expert_tensor, p.virtual_pipeline = 1, None
        dp = ParallelDims(world_size=world, tensor=tp, pipeline=pp, expert=ep,
                          expert_tensor=1).data
        cfg.train.global_batch_size = cfg.train.micro_batch_size * dp * max(1, pp)
        try:
            validate(cfg)
            check_config(cfg, launch=False)
            layouts.append({"world": world, "TP": tp, "PP": pp, "EP": ep, "DP": dp})
        except ConfigError:
            pass
        finally:
            (p.world_size, p.tensor, p.pipeline, p.expert, p.expert_tensor,
             p.virtual_pipeline, cfg.train.global_batch_size) = saved
    return layouts


def inspect(path: str, max_world: int) -> dict:
    from megamoe.checkpoint.load import damage, read_meta, resolve
    from megamoe.config import load_config

    step_dir = resolve(path, log=lambda msg: print(msg, file=sys.stderr))
    if step_dir is None:
        raise ValueError(f"{path}: no complete checkpoint")
    wrong = damage(step_dir)
    if wrong:
        raise ValueError(f"{step_dir}: damaged, not loadable: {'; '.join(wrong)}")
    meta = read_meta(step_dir)
    cfg_path = os.path.join(step_dir, "config.yaml")
    cfg = load_config(cfg_path) if os.path.isfile(cfg_path) else None
    rows = tensor_table(step_dir)
    return {
        "step_dir": step_dir, "meta": meta,
        "tensors": [{"key": k, "shape": list(s), "bytes": b} for k, s, b in rows],
        "total_bytes": sum(b for _, _, b in rows),
        "model_bytes": sum(b for k, _, b in rows if not k.startswith("optimizer.")),
        "loadable": loadable_layouts(cfg, max_world) if cfg else [],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.platform.bridge import quiet_megatron_warnings

    quiet_megatron_warnings()
    try:
        info = inspect(args.path, args.max_world)
    except ValueError as exc:
        print(f"inspect_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
        return 0
    m = info["meta"]
    print(f"{info['step_dir']}\n  step {m['step']}, consumed samples {m['consumed_samples']}, "
          f"saved under {m.get('layout')} ({m.get('world_size')} ranks), "
          f"optimizer state {'yes' if m.get('optimizer_saved') else 'no'}")
    print(f"  {len(info['tensors'])} tensors, {info['total_bytes'] / 2**20:.2f} MiB "
          f"(model {info['model_bytes'] / 2**20:.2f} MiB)")
    if args.tensors:
        for t in info["tensors"]:
            print(f"    {t['key']:70} {str(tuple(t['shape'])):24} {t['bytes']:>12,} B")
    combos = info["loadable"]
    print(f"  loads into {len(combos)} layouts up to {args.max_world} ranks (expert-TP 1), e.g.:")
    for c in combos[:12]:
        print(f"    world {c['world']}: TP{c['TP']}·PP{c['PP']}·EP{c['EP']}·DP{c['DP']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
