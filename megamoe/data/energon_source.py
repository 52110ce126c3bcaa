"""`data.kind: energon`: the vlm family's samples streamed from a prepared Energon dataset
(`data.path`), one stream per DP rank through Energon's savable loader.

    train, valid = EnergonSource(cfg, "train", ...), EnergonSource(cfg, "val", ...)
    loader = train.make_loader(collate, global_batch_size=G, micro_batch_size=b,
                               dp_rank=r, dp_size=D)      # the DataLoader interface
    loader.step_batches(); loader.state_dict(); loader.load_state_dict(state)

Order. Energon splits the train shards over the D ranks (× data.num_workers workers each) and
shuffles within them (seeded by run.seed); rank r's micro-batches are its stream's next b
samples. A step's union over ranks therefore depends on D — unlike the random-access sources,
so the state only resumes under the same DP size and worker count (anything else is refused
with one error saying what changed).

State (saved in checkpoints, megamoe.checkpoint.state): `consumed_samples`; `stream` (the DP
size and workers, the same on every rank); `source` (per rank: its DP rank, its bad-sample
count and Energon's `save_state_rank()`, pickled), saved once per DP rank.

Bad samples: one line each naming shard, key and reason; counted (`metrics()`); skipped by
Energon before batching, so every rank's micro-batches stay full and no collective is
missed. Shards a reader would crash on are left out up front (megamoe.data.energon_shards).
With data.strict any of these stops every rank at the same step with one error: each step
ends with an agreement over all ranks (one all-reduce), so a failing rank never leaves the
others waiting in a collective.

Validation: the first `eval_iters` global batches of the val split, read once and kept (the
same batches at every validation); a split shorter than that wraps around.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import warnings

import numpy as np
import torch

from megamoe.parallel.dims import microbatches_per_step

# Energon's loader asks torch for pinned memory, which warns on every iterator without a GPU
warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")


def build_energon_sources(data_cfg, image_tokens: int, seq_length: int, seed: int):
    """(train, valid, vocab_size): the dataset's train and val splits (vocabulary: the scenes
    word tokenizer's, megamoe.data.energon_encoder)."""
    from megamoe.data.scenes import scenes_tokenizer

    common = dict(image_size=data_cfg.image_size, image_tokens=image_tokens,
                  seq_length=seq_length, seed=seed)
    return (EnergonSource(data_cfg, "train", **common), EnergonSource(data_cfg, "val", **common),
            scenes_tokenizer().vocab_size)


class EnergonSource:
    """One split (`train` or `val`) of the dataset at data.path, read for a vlm model."""

    def __init__(self, data_cfg, part: str, *, image_size: int, image_tokens: int,
                 seq_length: int, seed: int, log=None):
        from megamoe.data.energon_shards import dataset_info

        dataset_info(data_cfg.path)               # a clear error before any Energon import
        self.path, self.part, self.seed = data_cfg.path, part, seed
        self.strict, self.num_workers = data_cfg.strict, data_cfg.num_workers
        self.shuffle_buffer = data_cfg.shuffle_buffer
        # data.packing: a micro-batch of b sample slots is b / pack_samples packed rows, each
        # filled greedily from Energon's packing buffer (megamoe.data.energon_encoder)
        self.pack_k = data_cfg.pack_samples if getattr(data_cfg, "packing", False) else None
        self.encoder_args = dict(image_size=image_size, image_tokens=image_tokens,
                                 seq_length=seq_length, strict=data_cfg.strict,
                                 packing=self.pack_k is not None)
        self.log = log or (lambda msg: print(f"[megamoe] {msg}", file=sys.stderr, flush=True))
        self._val_loaders: dict = {}

    def make_loader(self, collate, *, global_batch_size: int, micro_batch_size: int,
                    dp_rank: int, dp_size: int, consumed_samples: int = 0):
        """A train stream, or the val loader (kept: every validation peeks the same batches
        without reading the split again)."""
        args = dict(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                    dp_rank=dp_rank, dp_size=dp_size)
        if self.part == "train":
            return EnergonLoader(self, collate, consumed_samples=consumed_samples, **args)
        key = (collate, *args.values())
        if key not in self._val_loaders:
            self._val_loaders[key] = EnergonValLoader(self, collate, **args)
        return self._val_loaders[key]


class EnergonLoader:
    """This DP rank's stream of micro-batches (module docstring)."""

    def __init__(self, source: EnergonSource, collate, *, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        self.micro_batches = microbatches_per_step(global_batch_size, micro_batch_size, dp_size)
        self.source, self.collate = source, collate
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples, self.bad_samples = consumed_samples, 0
        self.samples_read = 0         # packed: this rank's samples so far (their positions)
        self.replica = _replica_index(dp_rank)
        self.what = "data.strict" if source.strict else "data"    # the prefix of its errors
        self.loader, self._iter = agree(lambda: self._build(), self.what)

    def _build(self):
        from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset

        from megamoe.data.energon_encoder import VLMTaskEncoder

        s = self.source
        _, split_config = self._check_shards()
        self.encoder = VLMTaskEncoder(**s.encoder_args)
        self.encoder.report = self._report
        wc = WorkerConfig(rank=self.dp_rank, world_size=self.dp_size,
                          num_workers=s.num_workers, seed_offset=s.seed,
                          global_error_handler=self.encoder.on_error)
        dataset = get_train_dataset(
            s.path, split_part=s.part, worker_config=wc, batch_size=self.rows,
            batch_drop_last=True, shuffle_buffer_size=s.shuffle_buffer or None,
            packing_buffer_size=self.pack_buffer,
            max_samples_per_sequence=None, task_encoder=self.encoder,
            **_split_kwargs(split_config))
        _remove(split_config)                     # read while the dataset was built
        loader = get_savable_loader(dataset, watchdog_timeout_seconds=None)
        return loader, None

    @property
    def rows(self) -> int:
        """Sequences per micro-batch (packed: micro_batch_size / data.pack_samples)."""
        return self.micro_batch_size // (self.source.pack_k or 1)

    @property
    def pack_buffer(self) -> int | None:
        """Samples Energon buffers to plan packs from (None: no packing)."""
        return None if self.source.pack_k is None else 4 * self.micro_batch_size

    def _check_shards(self):
        """Damaged shards of the split: logged and counted once (by DP rank 0), or with
        data.strict the error; returns them and the split config without them."""
        from megamoe.data.energon_shards import check_split

        bad, split_config = check_split(self.source.path, self.source.part)
        if bad and self.source.strict:
            raise ValueError(bad[0].line(skipped=False))
        if self.dp_rank == 0 and self.replica == 0:
            for b in bad:
                self.source.log(b.line())
                self.bad_samples += b.samples if self.source.part == "train" else 0
        return bad, split_config

    # ---- the DataLoader interface ----------------------------------------------------------------

    def step_batches(self) -> list:
        """This rank's micro-batches of the next step; every rank stops together on an error."""
        out = agree(lambda: self._read(self.micro_batches, self.consumed_samples), self.what)
        self.consumed_samples += self.global_batch_size
        return out

    def _read(self, count: int, consumed: int) -> list:
        out = []
        b, D = self.micro_batch_size, self.dp_size
        for m in range(count):
            with _quiet():
                if self._iter is None:
                    self._iter = iter(self.loader)
                batch = next(self._iter)
            for record in batch.pop("bad"):
                self._report(record)
            if "packs" in batch:       # positions: this rank's samples, interleaved over ranks
                n = len(batch["key"])
                positions = (self.samples_read + np.arange(n, dtype=np.int64)) * D + self.dp_rank
                self.samples_read += n
                out.append(self.collate(batch["packs"], positions))
                continue
            start = consumed + m * b * D + self.dp_rank * b
            out.append(self.collate(batch, np.arange(start, start + b, dtype=np.int64)))
        return out

    def _report(self, record) -> None:
        self.source.log(record.line())
        self.bad_samples += 1

    def metrics(self) -> dict:
        """This rank's counts since the run started (summed over ranks by the loop)."""
        return {"bad_samples": self.bad_samples}

    def state_dict(self) -> dict:
        state = self.loader.save_state_rank()
        return {"consumed_samples": int(self.consumed_samples),
                "stream": {"dp_size": self.dp_size, "num_workers": self.source.num_workers,
                           "micro_batch_size": self.micro_batch_size,
                           "packing": self.source.pack_k},
                "source": {"dp_rank": self.dp_rank, "dp_size": self.dp_size,
                           "replica": self.replica, "bad_samples": self.bad_samples,
                           "samples_read": self.samples_read,
                           "energon": torch.frombuffer(bytearray(pickle.dumps(state)),
                                                       dtype=torch.uint8)}}

    def load_state_dict(self, state: dict) -> None:
        stream = state.get("stream")
        if stream is None:
            raise ValueError("data loader state: the checkpoint was written by a random-access "
                             "source (no Energon stream position); data.kind energon cannot "
                             "resume from it (start fresh: train.resume=none)")
        mine = {"dp_size": self.dp_size, "num_workers": self.source.num_workers,
                "micro_batch_size": self.micro_batch_size, "packing": self.source.pack_k}
        changed = [f"{k} {stream[k]} -> {mine[k]}" for k in mine if stream.get(k) != mine[k]]
        if changed:
            raise ValueError(
                "data loader state: the Energon stream was saved under another layout ("
                + ", ".join(changed) + "): its per-rank position cannot be carried over "
                "exactly; resume with the same DP size, data.num_workers, "
                "train.micro_batch_size and data.packing, or start fresh (train.resume=none)")
        source = state.get("source")
        assert source is not None and source["dp_rank"] == self.dp_rank, (source, self.dp_rank)
        assert self._iter is None, "restore before the first step"
        self.loader.restore_state_rank(pickle.loads(source["energon"].numpy().tobytes()))
        self.consumed_samples = int(state["consumed_samples"])
        self.bad_samples = int(source["bad_samples"])
        self.samples_read = int(source.get("samples_read", 0))


class EnergonValLoader(EnergonLoader):
    """The val split, read once: `peek` returns the same micro-batches at every validation."""

    def _build(self):
        from megatron.energon import WorkerConfig, get_loader, get_val_dataset

        from megamoe.data.energon_encoder import VLMTaskEncoder

        s = self.source
        _, split_config = self._check_shards()
        self.encoder = VLMTaskEncoder(**s.encoder_args)
        wc = WorkerConfig(rank=self.dp_rank, world_size=self.dp_size, num_workers=0,
                          global_error_handler=self.encoder.on_error)
        dataset = get_val_dataset(s.path, split_part=s.part, worker_config=wc,
                                  batch_size=self.rows, batch_drop_last=True,
                                  packing_buffer_size=self.pack_buffer,
                                  task_encoder=self.encoder,
                                  **_split_kwargs(split_config))
        _remove(split_config)
        self._cache: list = []
        return get_loader(dataset, watchdog_timeout_seconds=None), None

    def peek(self, consumed_samples: int) -> list:
        step = consumed_samples // self.global_batch_size
        return agree(lambda: self._cached(step), self.what)

    def _cached(self, step: int) -> list:
        while len(self._cache) <= step:
            try:
                consumed = len(self._cache) * self.global_batch_size
                self._cache.append(self._read(self.micro_batches, consumed))
            except StopIteration:
                if self._iter is not None and not self._cache:
                    raise ValueError(f"data.path: the '{self.source.part}' split of "
                                     f"{self.source.path} holds fewer than "
                                     f"{self.micro_batch_size} samples for DP rank "
                                     f"{self.dp_rank}") from None
                self._iter = None         # wrap: read the split again
        return self._cache[step]

    def step_batches(self) -> list:
        raise AssertionError("the val split is read with peek()")


def _split_kwargs(split_config: str | None) -> dict:
    """Energon's `split_config` argument: a split without the damaged shards, if any."""
    return {"split_config": split_config} if split_config else {}


def _remove(path: str | None) -> None:
    if path is not None and os.path.exists(path):
        os.remove(path)


def agree(fn, what: str):
    """fn() on every rank; if it raised on any rank, every rank raises one ValueError with the
    first failing rank's message (one all-reduce; the messages only on failure)."""
    import torch.distributed as dist

    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        error = _one_line(exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megamoe.launch.env import collective_device

        failed = torch.tensor([0.0 if error is None else 1.0], device=collective_device())
        dist.all_reduce(failed)
        if failed.item() > 0:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            first = next((r, e) for r, e in enumerate(errors) if e is not None)
            raise ValueError(f"{what}: {first[1]} (rank {first[0]}; every rank stopped)")
    if error is not None:
        raise ValueError(f"{what}: {error}")
    return result


def _one_line(exc: BaseException) -> str:
    """The message of a (possibly worker-wrapped) error: the line naming a bad sample or shard
    when there is one, else the last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        for tag in ("bad sample ", "bad shard "):
            if tag in ln:
                return ln[ln.index(tag):].rstrip(".")
    return (lines[-1] if lines else type(exc).__name__)[:400]


def _replica_index(dp_rank: int) -> int:
    """This rank's position among the ranks that share its DP rank (TP and PP peers read the
    same stream; the one with index 0 saves it). One all-gather at start-up."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return 0
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, dp_rank)
    return ranks[:dist.get_rank()].count(dp_rank)


@contextlib.contextmanager
def _quiet():
    """Drop Energon's own prints for errors its handler took while reading (our handler logs one
    line per bad sample) and its packing buffer's progress bar; every other line is passed on.
    Worker processes forked meanwhile (at the first read) keep the filter."""
    from megamoe.data.energon_encoder import DropNoise

    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = DropNoise(saved[0]), DropNoise(saved[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.close_line()
        sys.stdout, sys.stderr = saved
