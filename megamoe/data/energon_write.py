"""Image-text JSONL -> WebDataset tar shards prepared for Megatron-Energon
(`tools/preprocess_data.py --kind image-text`).

Input: one JSON object per line, an image path (relative to the JSONL's folder unless absolute)
and its text, in one of three shapes:
    {"image": "a.png", "caption": "two shapes: ..."}                    -> CaptioningSample
    {"image": "a.png", "question": "what colour ...?", "answer": "red"}   -> VQASample
    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nwhat ...?"},
                                         {"from": "gpt", "value": "red"}]}  -> VQASample
The first good record fixes the dataset's sample type; a record of the other shape is refused.

Output: shards `DIR/shard-NNNNNN.tar`, `samples_per_shard` samples each; sample KEY's files
are grouped: KEY.png (or .jpg: --image-format; an image already in that format is copied byte
for byte, others are re-encoded with Pillow), and KEY.txt (caption) or KEY.question.txt +
KEY.answer.txt. KEY is the JSONL line number (zero-padded), so a sample names its record. Then
`energon prepare --non-interactive` writes DIR/.nv-meta (split ratio, sample type, field map).

Refused records (missing image file, unreadable image, empty caption/question/answer, invalid
JSON, a record of the other shape) are reported one line each, naming file and line; nothing
else stops the run unless no record is usable.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass, field

SAMPLE_TYPES = {"caption": "CaptioningSample", "vqa": "VQASample"}
FIELD_MAPS = {"caption": {"image": "{ext}", "caption": "txt"},
              "vqa": {"image": "{ext}", "context": "question.txt", "answers": "answer.txt"}}
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG"}


class RecordError(ValueError):
    """A refused input record (the message says why)."""


@dataclass
class WriteReport:
    written: int = 0
    shards: list = field(default_factory=list)
    refused: list = field(default_factory=list)    # "FILE:LINE: reason"
    sample_type: str | None = None


def parse_record(obj, base_dir: str) -> tuple[str, str, dict]:
    """(kind, image path, text parts) of one JSON record; RecordError saying what is wrong."""
    if not isinstance(obj, dict):
        raise RecordError(f"not a JSON object ({type(obj).__name__})")
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise RecordError("no 'image' path")
    path = image if os.path.isabs(image) else os.path.join(base_dir, image)
    if "caption" in obj:
        kind, text = "caption", {"txt": obj["caption"]}
    elif "question" in obj or "answer" in obj:
        kind, text = "vqa", {"question.txt": obj.get("question"), "answer.txt": obj.get("answer")}
    elif "conversations" in obj:
        kind, text = "vqa", _conversation(obj["conversations"])
    else:
        raise RecordError("no 'caption', 'question'/'answer' or 'conversations' field")
    for name, value in text.items():
        what = {"txt": "caption", "question.txt": "question", "answer.txt": "answer"}[name]
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"empty {what}")
        text[name] = value.strip()
    return kind, path, text


def _conversation(turns) -> dict:
    """The first human turn (without its <image> tag) as the question, the next turn as answer."""
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns):
        raise RecordError("'conversations' must hold a question turn and an answer turn")
    question = str(turns[0].get("value", "")).replace("<image>", " ").strip()
    return {"question.txt": question, "answer.txt": turns[1].get("value")}


def image_bytes(path: str, fmt: str) -> bytes:
    """The file's bytes in `fmt` (png, jpg), checked by decoding them fully with Pillow."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise RecordError(f"missing image file {path}")
    try:
        raw = open(path, "rb").read()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()                         # a truncated file fails here, not at verify()
            if img.format == _PIL_FORMATS[fmt]:
                return raw
            out = io.BytesIO()
            img.convert("RGB").save(out, _PIL_FORMATS[fmt])
            return out.getvalue()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise RecordError(f"unreadable image {path} ({exc})") from None


class ShardWriter:
    """Tar shards of `samples_per_shard` samples, each sample's files next to each other."""

    def __init__(self, out_dir: str, samples_per_shard: int):
        self.out_dir, self.per_shard = out_dir, samples_per_shard
        self.tar, self.count, self.shards = None, 0, []

    def add(self, key: str, files: dict[str, bytes]) -> None:
        if self.tar is None or self.count == self.per_shard:
            self._next()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def _next(self) -> None:
        self.close()
        name = f"shard-{len(self.shards):06d}.tar"
        self.shards.append(name)
        self.tar, self.count = tarfile.open(os.path.join(self.out_dir, name), "w"), 0

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def write_shards(jsonl: str, out_dir: str, *, samples_per_shard: int = 1000,
                 image_format: str = "png", progress: bool = True,
                 log=print) -> WriteReport:
    """Write the good records of `jsonl` as shards in `out_dir` (created); one `log` line per
    refused record. RecordError when the input has no good record."""
    from tqdm import tqdm

    if not os.path.isfile(jsonl):
        raise RecordError(f"{jsonl}: no such file")
    if samples_per_shard < 1:
        raise RecordError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    base = os.path.dirname(os.path.abspath(jsonl))
    lines = open(jsonl, encoding="utf-8").read().splitlines()
    os.makedirs(out_dir, exist_ok=True)
    report, writer = WriteReport(), ShardWriter(out_dir, samples_per_shard)
    digits = max(9, len(str(len(lines))))
    try:
        for lineno, line in enumerate(tqdm(lines, unit="rec", disable=not progress,
                                           file=sys.stderr, desc="writing shards"), 1):
            if not line.strip():
                continue
            try:
                kind, path, text = parse_record(_json(line), base)
                if report.sample_type is None:
                    report.sample_type = kind
                elif kind != report.sample_type:
                    raise RecordError(f"a {kind} record in a {report.sample_type} dataset "
                                      "(one sample type per dataset)")
                files = {image_format: image_bytes(path, image_format),
                         **{ext: t.encode() for ext, t in text.items()}}
            except RecordError as exc:
                report.refused.append(f"{jsonl}:{lineno}: {exc}")
                log(f"refused {jsonl}:{lineno}: {exc}")
                continue
            writer.add(f"{lineno:0{digits}d}", files)
            report.written += 1
    finally:
        writer.close()
    report.shards = writer.shards
    if not report.written:
        raise RecordError(f"{jsonl}: no usable record ({len(report.refused)} refused)")
    return report


def _json(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None


def prepare(out_dir: str, sample_type: str, *, split_ratio: str = "0.9,0.1,0",
            image_format: str = "png") -> None:
    """`energon prepare --non-interactive` on `out_dir` (Energon's click command, run in this
    process; its own report is kept out of ours unless it fails)."""
    field_map = {k: v.format(ext=image_format) for k, v in FIELD_MAPS[sample_type].items()}
    energon_cli(["prepare", out_dir, "--non-interactive", "--force-overwrite", "--no-progress",
                 "--num-workers", "1", "--split-ratio", split_ratio,
                 "--sample-type", SAMPLE_TYPES[sample_type], "--field-map", json.dumps(field_map)])


def energon_cli(args: list[str]) -> None:
    """Run an `energon` command in this process, its output captured; RecordError with its last
    line when it fails."""
    import contextlib

    from megatron.energon.cli.main import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main.main(args, standalone_mode=False)
    except Exception as exc:  # noqa: BLE001 - click's and Energon's errors alike
        raise RecordError(f"{args[1]}: energon {args[0]} failed: {exc}") from exc
