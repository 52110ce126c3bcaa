"""Small Energon datasets for tests, made from megamoe's own scenes generator (no download):
an image-text JSONL with PNG files, the shards `tools/preprocess_data.py --kind image-text`
writes from it, and the damage the bad-sample tests need (a truncated image, a missing caption,
a truncated or unreadable shard)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from megamoe.data.scenes import CAPTION_PROMPT, describe_sample, render_scene


def write_scenes_jsonl(folder: str, count: int, *, kind: str = "caption", seed: int = 0,
                       image_size: int = 32, max_shapes: int = 3) -> str:
    """`count` scenes as folder/images/NNNN.png plus folder/data.jsonl (captions, or
    question + answer records for kind="vqa"); returns the JSONL's path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            d = describe_sample(seed, i, max_shapes, 0.0 if kind == "vqa" else 1.0, image_size)
            img_HWC = np.transpose(render_scene(seed, i, max_shapes, image_size), (1, 2, 0))
            name = f"images/{i:04d}.png"
            Image.fromarray(img_HWC).save(os.path.join(folder, name))
            record = ({"image": name, "caption": d["caption"]} if kind == "caption" else
                      {"image": name, "question": d["prompt"], "answer": d["answer"]})
            assert kind != "caption" or d["prompt"] == CAPTION_PROMPT
            f.write(json.dumps(record) + "\n")
    return path


def make_dataset(folder: str, count: int, *, samples_per_shard: int = 8, kind: str = "caption",
                 split_ratio: str = "1,0,0", seed: int = 0) -> str:
    """A prepared Energon dataset of `count` scenes at folder/shards (returned)."""
    from megamoe.data.energon_write import prepare, write_shards

    jsonl = write_scenes_jsonl(os.path.join(folder, "raw"), count, kind=kind, seed=seed)
    out = os.path.join(folder, "shards")
    report = write_shards(jsonl, out, samples_per_shard=samples_per_shard, progress=False,
                          log=lambda *_: None)
    prepare(out, report.sample_type, split_ratio=split_ratio)
    return out


def rewrite_member(shard: str, member: str, data: bytes | None) -> None:
    """Replace `member` of the tar `shard` by `data` (None: drop it), keeping the others in
    order; then rebuild the shard's Energon index (as if the damage predated `prepare`)."""
    with tarfile.open(shard) as tar:
        items = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert member in [m.name for m, _ in items], (member, shard)
    with tarfile.open(shard, "w") as tar:
        for m, payload in items:
            if m.name == member:
                if data is None:
                    continue
                payload = data
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def reindex(dataset: str) -> None:
    """`energon prepare --tar-index-only`: the shards' sample offsets after a rewrite."""
    from megamoe.data.energon_write import energon_cli

    energon_cli(["prepare", dataset, "--tar-index-only", "--no-progress", "--num-workers", "1"])


def truncate_file(path: str, keep: float = 0.5) -> None:
    """Cut `path` to the first `keep` fraction of its bytes (after `prepare`: the index still
    promises the whole file)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def member_bytes(shard: str, member: str) -> bytes:
    with tarfile.open(shard) as tar:
        return tar.extractfile(member).read()
