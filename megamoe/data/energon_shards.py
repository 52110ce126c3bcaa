"""Checks a prepared Energon dataset's shards before reading them: Energon's reader seeks to the
byte offsets `energon prepare` recorded (KEY.tar.idx), and a shard that is shorter than those
offsets or not a tar at all crashes its loader mid-epoch even with a skipping error handler.
A damaged shard is left out of the split instead (a split config with it excluded), with one
line naming it and the number of samples lost.
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
import tempfile
from dataclasses import dataclass

import yaml

META = ".nv-meta"


@dataclass(frozen=True)
class BadShard:
    shard: str
    samples: int
    reason: str

    def line(self, skipped: bool = True) -> str:
        tail = f"; its {self.samples} samples skipped" if skipped else ""
        return f"bad shard {self.shard}: {self.reason}{tail}"


def dataset_info(path: str) -> tuple[dict, dict]:
    """(shard_counts, split config) of a prepared dataset; ValueError naming data.path when it
    is not one."""
    info_file, split_file = (os.path.join(path, META, n) for n in (".info.json", "split.yaml"))
    if not (os.path.isfile(info_file) and os.path.isfile(split_file)):
        raise ValueError(f"data.path: {path} is not a prepared Energon dataset (no "
                         f"{META}/.info.json and split.yaml; run tools/preprocess_data.py "
                         "--kind image-text or `energon prepare`)")
    with open(info_file) as f:
        counts = json.load(f)["shard_counts"]
    with open(split_file) as f:
        split = yaml.safe_load(f)
    return counts, split


def split_shards(split: dict, part: str) -> list[str]:
    import braceexpand

    excluded = set(split.get("exclude") or [])
    return [name for pattern in split["split_parts"].get(part) or []
            for name in braceexpand.braceexpand(pattern) if name not in excluded]


def shard_problem(path: str, name: str) -> str | None:
    """Why shard `name` of the dataset at `path` cannot be read as indexed (None: it can): its
    size against the end its index records, and a tar header where each sample starts (one
    512-byte read per sample; the reader would stop the loader at a bad one)."""
    shard = os.path.join(path, name)
    try:
        with open(shard + ".idx", "rb") as f:
            raw = f.read()
        offsets = struct.unpack(f"<{len(raw) // 8}Q", raw[:len(raw) // 8 * 8])
        size = os.path.getsize(shard)
        if offsets and size < offsets[-1]:
            return f"truncated ({size:,} bytes, its index ends at {offsets[-1]:,})"
        with open(shard, "rb") as f:
            for offset in offsets[:-1] or (0,):
                f.seek(offset)
                head = f.read(tarfile.BLOCKSIZE)
                try:
                    tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
                except tarfile.HeaderError as exc:
                    where = "not a tar file" if offset == 0 else f"no tar header at byte {offset:,}"
                    return f"unreadable ({where}: {exc})"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def check_split(path: str, part: str) -> tuple[list[BadShard], str | None]:
    """(damaged shards of split `part`, the path of a split config without them, or None when
    none is damaged). ValueError naming data.path when no shard of the split is readable."""
    counts, split = dataset_info(path)
    names = split_shards(split, part)
    if not names:
        raise ValueError(f"data.path: {path} has no '{part}' shards (energon prepare "
                         "--split-ratio gives each split its share)")
    bad = [BadShard(n, int(counts.get(n, 0)), why) for n in names
           if (why := shard_problem(path, n)) is not None]
    if not bad:
        return [], None
    if len(bad) == len(names):
        raise ValueError(f"data.path: every '{part}' shard of {path} is damaged: "
                         + "; ".join(b.line() for b in bad))
    fixed = {**split, "exclude": [*(split.get("exclude") or []), *(b.shard for b in bad)]}
    fd, out = tempfile.mkstemp(prefix="megamoe-split-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(fixed, f)
    return bad, out


def check_energon_config(cfg) -> None:
    """Before any rank starts: data.path is a prepared dataset with train and val shards, and
    its sample type is one the vlm family reads (one error naming the field)."""
    from megamoe.config.errors import fail

    path = cfg.data.path
    try:
        _, split = dataset_info(path)
    except ValueError as exc:
        fail("data.path", str(exc).removeprefix("data.path: "))
    for part in ("train", "val"):
        if not split_shards(split, part):
            fail("data.path", f"{path} has no '{part}' shards (tools/preprocess_data.py "
                 "--split-ratio gives each split its share)")
    described = os.path.join(path, META, "dataset.yaml")
    sample_type = None
    if os.path.isfile(described):
        with open(described) as f:
            sample_type = ((yaml.safe_load(f) or {}).get("sample_type") or {}).get("__class__")
    if sample_type not in ("CaptioningSample", "VQASample"):
        fail("data.path", f"{path} holds {sample_type or 'no sample type'}: the vlm family "
             "reads CaptioningSample or VQASample shards")
    if sample_type == "VQASample" and cfg.model.vlm.contrastive_coeff > 0:
        fail("model.vlm.contrastive_coeff", f"{path} holds VQA samples, which have no "
             "caption to pair with the image: set it to 0")
