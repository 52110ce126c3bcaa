"""The engine-neutral checkpoint state: what every engine produces for a save and consumes on a
load, so checkpoint code never reaches into one engine's optimizer or modules.

Parts (each optional except model and progress):
- `model`: the model's sharded state dict per chunk (`model`, or `model0`, `model1`, … under
  virtual pipeline stages), keyed by global parameter names, so any layout loads it;
- `optimizer`: per-parameter optimizer state under the parameter's global key, sharded like the
  parameter (megamoe.engines.megatron_optimizer_state for Megatron's optimizer);
- `scheduler`: the LR schedule's state dict;
- `progress`: step and consumed samples;
- `data`: the data loader's state (megamoe.data.loader), one per data-parallel rank's view;
  checkpoints written before it existed hold only `progress.consumed_samples`. A streaming
  source's per-rank cursor (`data["source"]`, megamoe.data.energon_source) is saved apart, one
  object per DP rank (`data_source`), by the rank whose `replica` is 0;
- `rng`: this rank's RNG streams (a ShardedObject per rank).

On disk this is one `dist_checkpointing` sharded state dict; the keys are those megamoe wrote
before the engine protocol existed (`optimizer_state`; the loader state inside `progress`), so
older checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DATA_SOURCE = "data_source"


def data_source_sharded(source: dict):
    """A streaming source's cursor of one DP rank as a sharded object: entry `dp_rank` of
    `dp_size`, written by one of the ranks sharing that DP rank (`replica` 0)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(DATA_SOURCE, source, (source["dp_size"],), (source["dp_rank"],),
                         replica_id=source.get("replica", 0))


@dataclass
class CheckpointState:
    model: dict
    progress: dict
    optimizer: dict | None = None
    scheduler: dict | None = None
    data: dict = field(default_factory=dict)
    rng: object = None

    def sharded(self) -> dict:
        """The one sharded state dict `dist_checkpointing` saves or fills on a load."""
        sd = dict(self.model)
        if self.optimizer is not None:
            sd["optimizer_state"] = self.optimizer
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler
        data = {k: v for k, v in self.data.items() if k != "source"}
        sd["progress"] = {**self.progress, **({"data": data} if data else {})}
        if "source" in self.data:
            sd[DATA_SOURCE] = data_source_sharded(self.data["source"])
        if self.rng is not None:
            sd["rng"] = self.rng
        return sd

    @classmethod
    def from_sharded(cls, sd: dict) -> "CheckpointState":
        """The state a load returned (`sd` from `dist_checkpointing.load`)."""
        progress = dict(sd["progress"])
        data = progress.pop("data", None) or {"consumed_samples": progress["consumed_samples"]}
        if DATA_SOURCE in sd:
            data = {**data, "source": sd[DATA_SOURCE]}
        model = {k: v for k, v in sd.items() if k == "model" or
                 (k.startswith("model") and k[5:].isdigit())}
        return cls(model=model, progress=progress, optimizer=sd.get("optimizer_state"),
                   scheduler=sd.get("scheduler"), data=data, rng=sd.get("rng"))
