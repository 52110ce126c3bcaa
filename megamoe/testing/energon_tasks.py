"""Pool tasks for the Energon tests: each rank reads its DP share of a prepared dataset through
megamoe.data.energon_source, and reports the sample keys it got, the bad-sample lines it logged,
or the error it stopped with."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch.distributed as dist

from megamoe.testing.energon_data import (make_dataset, member_bytes, reindex, rewrite_member,
                                          truncate_file)

G, B = 8, 2          # global and micro-batch size of the loader tests


def data_cfg(path: str, strict: bool = False, num_workers: int = 0, image_size: int = 32,
             packing: bool = False):
    return SimpleNamespace(path=path, strict=strict, num_workers=num_workers,
                           shuffle_buffer=10, image_size=image_size, packing=packing,
                           pack_samples=2)


def keys_collate(batch, sample_index) -> list:
    """The keys of a micro-batch (packed: the packs' keys, with the rows' lengths)."""
    if isinstance(batch, list):
        return [[*p["key"], int((p["segment_ids"] >= 0).sum())] for p in batch]
    return list(batch["key"])


def train_loader(path: str, *, strict: bool = False, dp_rank: int = 0, dp_size: int = 1,
                 log=None, num_workers: int = 0, packing: bool = False):
    from megamoe.data.energon_source import EnergonSource

    source = EnergonSource(data_cfg(path, strict, num_workers, packing=packing), "train",
                           image_size=32,
                           image_tokens=16, seq_length=96 if packing else 48, seed=1234, log=log)
    return source.make_loader(keys_collate, global_batch_size=G, micro_batch_size=B,
                              dp_rank=dp_rank, dp_size=dp_size)


# ---- damage --------------------------------------------------------------------------------------

DAMAGE = ("truncated_image", "missing_caption", "truncated_shard", "unreadable_shard",
          "corrupt_shard")


def damage(path: str, kind: str, shard: int) -> str:
    """Damage shard number `shard` of the dataset at `path` as `kind` says; returns what a
    report must name: 'shard/key' for a sample, the shard's name for a whole shard."""
    name = f"shard-{shard:06d}.tar"
    tar = os.path.join(path, name)
    first = sorted(n for n in _members(tar))[0].split(".")[0]
    if kind == "truncated_image":
        rewrite_member(tar, f"{first}.png", member_bytes(tar, f"{first}.png")[:300])
        reindex(path)
        return f"{name}/{first}"
    if kind == "missing_caption":
        rewrite_member(tar, f"{first}.txt", None)
        reindex(path)
        return f"{name}/{first}"
    if kind == "truncated_shard":
        truncate_file(tar, 0.5)
        return name
    with open(tar, "r+b") as f:
        if kind == "corrupt_shard":           # the fifth sample's tar header overwritten
            f.seek(_offsets(tar)[4])
        else:
            assert kind == "unreadable_shard", kind   # no tar header where the file starts
        f.write(b"\xff" * 512)
    return name


def _offsets(tar: str) -> tuple:
    """The samples' byte offsets `energon prepare` recorded (KEY.tar.idx)."""
    import struct

    raw = open(tar + ".idx", "rb").read()
    return struct.unpack(f"<{len(raw) // 8}Q", raw)


def _members(tar: str) -> list[str]:
    import tarfile

    with tarfile.open(tar) as t:
        return t.getnames()


def damaged_copy(base: str, out: str, kinds, first_shard: int = 1) -> list[str]:
    """A copy of the prepared dataset `base` with damage `kinds[i]` in shard first_shard + i."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    return [damage(out, kind, first_shard + i) for i, kind in enumerate(kinds)]


def build_dataset(folder: str, count: int = 64) -> str:
    """Pool task (rank 0 builds, the others wait): the prepared dataset of the DP tests."""
    path = os.path.join(folder, "shards")
    if dist.get_rank() == 0 and not os.path.isdir(path):
        make_dataset(folder, count, samples_per_shard=8, split_ratio="6,2,0")
    dist.barrier()
    return path


# ---- tasks ---------------------------------------------------------------------------------------

def read_steps(path: str, steps: int, strict: bool = False) -> dict:
    """Pool task: this DP rank's keys per step, its logged lines, its count and the summed count
    (or the error it stopped with)."""
    import torch

    lines = []
    try:
        loader = train_loader(path, strict=strict, dp_rank=dist.get_rank(),
                              dp_size=dist.get_world_size(), log=lines.append)
        keys = [loader.step_batches() for _ in range(steps)]
    except ValueError as exc:
        return {"error": str(exc), "lines": lines}
    total = torch.tensor([float(loader.metrics()["bad_samples"])])
    dist.all_reduce(total)
    return {"keys": keys, "lines": lines, "bad": loader.metrics()["bad_samples"],
            "bad_total": int(total.item())}


def resume_round_trip(path: str, root: str, before: int, after: int,
                      packing: bool = False) -> dict:
    """Pool task: read `before` steps, save the loader state in a checkpoint (the per-DP-rank
    sharded objects megamoe saves), read `after` more; then a fresh loader restored from the
    checkpoint, and one restored from the state after step 1 (the control), read `after` steps."""
    from megatron.core import dist_checkpointing

    from megamoe.checkpoint.load import _data_source_template
    from megamoe.checkpoint.state import CheckpointState

    r, D = dist.get_rank(), dist.get_world_size()
    a = train_loader(path, dp_rank=r, dp_size=D, packing=packing)
    early = None
    for i in range(before):
        a.step_batches()
        early = a.state_dict() if i == 0 else early
    progress = {"step": before, "consumed_samples": a.consumed_samples}
    state = CheckpointState(model={}, progress=progress, data=a.state_dict())
    if r == 0:
        os.makedirs(root, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state.sharded(), root)
    straight = [a.step_batches() for _ in range(after)]

    grid = SimpleNamespace(dp=SimpleNamespace(rank=lambda: r, size=lambda: D))
    meta = {"data_source_dp_size": D}
    template = CheckpointState(model={}, progress=dict(progress),
                               data=_data_source_template(meta, SimpleNamespace(grid=grid), {}))
    loaded = CheckpointState.from_sharded(dist_checkpointing.load(template.sharded(), root))
    b = train_loader(path, dp_rank=r, dp_size=D, packing=packing)
    b.load_state_dict(loaded.data)
    resumed = [b.step_batches() for _ in range(after)]
    c = train_loader(path, dp_rank=r, dp_size=D, packing=packing)
    c.load_state_dict(early)
    control = [c.step_batches() for _ in range(after)]
    return {"straight": straight, "resumed": resumed, "control": control,
            "consumed": b.consumed_samples, "data": {k: v for k, v in loaded.data.items()
                                                     if k != "source"}}
