"""Energon's TaskEncoder for the `vlm` family: a CaptioningSample or VQASample read from shards
becomes exactly the sample dict megamoe.data.scenes makes (image uint8 [3, H, W] resized to the
model's image size, tokens [S + 1], loss_mask [S], template, index, caption_tokens, caption_end),
and a micro-batch is those samples stacked as `ScenesDataset.get_batch` stacks them.

Text: the scenes word tokenizer (megamoe.data.scenes: the closed vocabulary the built-in data
uses), so shards written from scenes and the generated set train the same model; a word outside
it makes the sample bad. Captions are asked as "describe the image." with the caption as answer;
a VQA sample's question is the prompt and its first answer the answer.

Bad samples: anything wrong with one sample (an image Pillow cannot decode, a missing field, an
unknown word, too many tokens) becomes a `BadSample` record (shard, key, reason). Energon then
skips the sample before batching, so a micro-batch is always full. Read in the training process
(data.num_workers 0) a record is reported as the sample is met, so the count is part of the
reading position a checkpoint saves; from a worker process it travels attached to the next good
sample (a worker has no other way back; a record riding on a sample that sits in a packing
buffer at a save is not counted again after the resume). With `strict` the first one raises
`BadSampleError` instead.

Packing (data.packing): Energon buffers encoded samples and calls `select_samples_to_pack`
(megamoe.data.pack.plan_packs: greedy, in order, as many as fit in seq_length + 1 tokens) and
`pack_selected_samples` (pack_samples); a micro-batch is then a list of packed sequences, which
the vlm task collates (its list path). The buffer is part of Energon's saved state, so a resume
packs exactly as the uninterrupted run did.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from megatron.energon import DefaultTaskEncoder, SkipSample, stateless
from megatron.energon.errors import FatalSampleError

from megamoe.data.scenes import CAPTION, CAPTION_PROMPT, ScenesDataset, scenes_tokenizer

_BAD_KEY = "__megamoe_bad__"      # the records riding on a good sample
ENERGON_NOISE = ("Except ", "ErrorContext ")    # Energon's own prints for a handled error
_PACKING_BAR = "Filling reading buffer"          # the progress bar of its packing buffer


@dataclass(frozen=True)
class BadSample:
    shard: str
    key: str
    reason: str

    def line(self) -> str:
        return f"bad sample {self.shard}/{self.key}: {self.reason}"


class BadSampleError(FatalSampleError):
    """A bad sample under `data.strict` (Energon lets FatalSampleError through its handler)."""


def where(sample) -> tuple[str, str]:
    """(shard, key) of an Energon sample (or of a raw one, for errors before it was typed)."""
    from megatron.energon.source_info import get_source_info

    data = getattr(sample, "data", None)       # a raw sample (RawSampleData): its files' dict
    if isinstance(data, tuple) and data and isinstance(data[0], dict):
        sample = data[0]
    sources = get_source_info(sample) or []
    shard = sources[0].shard_name if sources else "?"
    key = getattr(sample, "__key__", None)
    if key is None and isinstance(sample, dict):
        key = sample.get("__key__")
    if key is None and sources:
        key = sources[0].index
    return shard.rsplit("/", 1)[-1], str(key).rsplit("/", 1)[-1]


def _reason(exc: Exception) -> str:
    """One short line: Energon's field-access errors print the whole sample after " in {"."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text.startswith("Cannot access '"):
        text = f"no '{text.split(chr(39))[1]}' file (the field map needs it)"
    return text.split(" in {")[0][:300]


class VLMTaskEncoder(DefaultTaskEncoder):
    """encode_sample: Energon sample -> scenes sample dict; batch: stacked like get_batch."""

    decoder = None       # bytes in: images are decoded here, with Pillow, so a bad one is ours

    def __init__(self, *, image_size: int, image_tokens: int, seq_length: int,
                 strict: bool = False, packing: bool = False):
        super().__init__()
        self.image_size, self.strict = image_size, strict
        self.seq_length, self.packing = seq_length, packing
        # the scenes set's tokenisation (sequence(), caption_sequence()) with the model's sizes
        self.text = ScenesDataset(image_size=image_size, tokenizer=scenes_tokenizer(),
                                  image_tokens=image_tokens, seq_length=seq_length,
                                  max_shapes=3, caption_fraction=1.0)
        self.pending: list[BadSample] = []      # a worker's records not yet delivered
        self.report = None       # the training process's reporter (set by the loader)

    # ---- one sample ------------------------------------------------------------------------------

    @stateless   # output: a function of the sample (Energon re-encodes a saved packing buffer)
    def encode_sample(self, sample) -> dict:
        try:
            out = self._encode(sample)
        except (SkipSample, FatalSampleError):
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of one sample is a bad sample
            self.bad(BadSample(*where(sample), _reason(exc)))
            raise SkipSample() from None
        out[_BAD_KEY], self.pending = self.pending, []
        # where Energon finds the sample again (a packing buffer is saved as these keys)
        out["__restore_key__"] = getattr(sample, "__restore_key__", ())
        return out

    def on_error(self, exc: Exception, sample, sources=None) -> None:
        """Energon's error handler (WorkerConfig.global_error_handler): a sample that failed
        outside encode_sample, e.g. a file of the field map missing from the shard."""
        self.bad(BadSample(*where(sample), _reason(exc)))

    def bad(self, record: BadSample) -> None:
        """Record a bad sample (strict: stop with it)."""
        if self.strict:
            raise BadSampleError(record.line())
        from torch.utils.data import get_worker_info

        if self.report is not None and get_worker_info() is None:
            self.report(record)          # in the training process: counted as it is met
        else:
            self.pending.append(record)

    def _encode(self, sample) -> dict:
        shard, key = where(sample)
        if hasattr(sample, "caption"):
            template, prompt, answer = CAPTION, CAPTION_PROMPT, _text(sample.caption, "caption")
            caption = answer
        else:
            answers = sample.answers if isinstance(sample.answers, list) else [sample.answers]
            template, prompt = -1, _text(sample.context, "question")
            answer = _text(answers[0] if answers else None, "answer")
            caption = ""          # a VQA record has no caption: contrastive pairs need one
        index = int(key) if key.isdigit() else -1
        d = {"prompt": prompt, "answer": answer, "caption": caption, "index": index}
        try:
            tokens_S1, loss_mask_S = self.text.sequence(d)
        except ValueError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None   # drop the scenes' naming
        caption_L, caption_end = self.text.caption_sequence(d)
        return {"image": decode_image(sample.image, self.image_size), "tokens": tokens_S1,
                "loss_mask": loss_mask_S, "template": template, "index": index,
                "prompt_text": prompt, "answer_text": answer, "caption_tokens": caption_L,
                "caption_end": caption_end, "key": f"{shard}/{key}"}

    # ---- a micro-batch ---------------------------------------------------------------------------

    def batch(self, samples: list[dict]) -> dict:
        """The samples stacked as ScenesDataset.get_batch stacks them, plus their keys and the
        bad-sample records they carried; packed: {"packs": the packed sequences, keys, records}."""
        if self.packing:
            return {"packs": [{k: v for k, v in s.items() if k not in ("bad", "__restore_key__")}
                              for s in samples],
                    "key": [k for s in samples for k in s["key"]],
                    "bad": [r for s in samples for r in s["bad"]]}
        stack = {k: np.stack([s[k] for s in samples]) for k in
                 ("image", "tokens", "loss_mask", "caption_tokens")}
        return {"images": stack["image"], "tokens": stack["tokens"],
                "loss_mask": stack["loss_mask"], "caption_tokens": stack["caption_tokens"],
                **{k: np.array([s[k] for s in samples], np.int64)
                   for k in ("template", "index", "caption_end")},
                **{k: [s[k] for s in samples] for k in ("prompt_text", "answer_text", "key")},
                "bad": [r for s in samples for r in s[_BAD_KEY]]}

    def encode_batch(self, batch: dict) -> dict:
        return batch

    # ---- packing (megamoe.data.pack) -------------------------------------------------------------

    def select_samples_to_pack(self, samples: list[dict]) -> list[list[dict]]:
        from megamoe.data.pack import plan_packs, sample_length

        plan = plan_packs([sample_length(s) for s in samples], self.seq_length)
        return [[samples[i] for i in pack] for pack in plan]

    @stateless
    def pack_selected_samples(self, samples: list[dict]) -> dict:
        from megamoe.data.pack import pack_samples

        return {**pack_samples(samples, self.seq_length), "key": [s["key"] for s in samples],
                "bad": [r for s in samples for r in s[_BAD_KEY]], "__restore_key__": ()}


def _text(value, what: str) -> str:
    """Text of a sample field (bytes from the shard, or str), which must not be empty."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"empty {what}")
    return value.strip()


def decode_image(data, image_size: int) -> np.ndarray:
    """uint8 [3, H, W]: encoded image bytes decoded with Pillow (fully: a truncated file
    fails), as RGB, resized to image_size × image_size when it is another size."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"image: expected encoded bytes, got {type(data).__name__}")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(rgb, np.uint8).transpose(2, 0, 1))


class DropNoise(io.TextIOBase):
    """A stdout (stderr) that drops Energon's prints for errors its handler took (our handler
    logs one line per bad sample) and its packing buffer's progress bar, and passes every other
    line on (megamoe.data.energon_source installs
    it while it reads; loader workers forked meanwhile keep it)."""

    def __init__(self, out):
        self.out, self.pending = out, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not (line.lstrip("\r").startswith(ENERGON_NOISE) or _PACKING_BAR in line):
                self.out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def close_line(self) -> None:
        """Pass on a last line without its newline yet."""
        if self.pending:
            self.out.write(self.pending)
            self.pending = ""

