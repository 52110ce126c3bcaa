"""tools/preprocess_data.py --kind image-text and data.kind energon on one process: records
refused one line each (file and line named) and summarised; each sample's files grouped in its
shard; Energon's dataset.yaml names the sample type and field map. A sample read back is
exactly the scenes set's sample of the same scene (tokens, loss mask, caption, pixels); with
another model image size it is resized. Damaged shards skip one line per bad sample."""

import json
import os
import tarfile

import numpy as np
import pytest
import yaml

pytest.importorskip("megatron.energon")

from megamoe.data.scenes import ScenesDataset, scenes_tokenizer  # noqa: E402
from megamoe.testing.energon_data import make_dataset, write_scenes_jsonl  # noqa: E402
from megamoe.testing.energon_tasks import data_cfg  # noqa: E402
from tools import preprocess_data  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("energon")), 24, samples_per_shard=8,
                        split_ratio="2,1,0")


def _bad_records(folder):
    """Appends five bad records (lines 7 … 11) to a six-record caption JSONL."""
    path = write_scenes_jsonl(folder, 6)
    png = open(os.path.join(folder, "images", "0000.png"), "rb").read()
    open(os.path.join(folder, "images", "cut.png"), "wb").write(png[:len(png) // 2])
    with open(path, "a") as f:
        f.write(json.dumps({"image": "images/none.png", "caption": "one shape: a red star"}) + "\n")
        f.write(json.dumps({"image": "images/cut.png", "caption": "one shape: a red star"}) + "\n")
        f.write(json.dumps({"image": "images/0001.png", "caption": "  "}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"image": "images/0001.png", "question": "how many shapes are "
                            "there?", "answer": "one"}) + "\n")
    return path


def test_tool_writes_grouped_shards_and_reports_each_refused_record(tmp_path, capsys):
    jsonl = _bad_records(str(tmp_path / "raw"))
    out = tmp_path / "shards"
    rc = preprocess_data.main(["--kind", "image-text", "--input", jsonl, "--output-dir",
                               str(out), "--samples-per-shard", "4", "--split-ratio", "1,1,0",
                               "--no-progress"])
    err, stdout = capsys.readouterr()[::-1]
    assert rc == 0, err
    refused = [ln for ln in err.splitlines() if "refused" in ln]
    assert [ln.split(":")[2] for ln in refused] == ["7", "8", "9", "10", "11"], refused
    for line, why in zip(refused, ("missing image file", "unreadable image", "empty caption",
                                   "invalid JSON", "a vqa record in a caption dataset")):
        assert f"{jsonl}:" in line and why in line, line
    assert "6 caption samples in 2 shards (4 per shard)" in stdout and "refused 5" in stdout
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names == [f"{k:09d}.{e}" for k in range(1, 5) for e in ("png", "txt")]
    meta = yaml.safe_load((out / ".nv-meta" / "dataset.yaml").read_text())
    assert meta["sample_type"]["__class__"] == "CaptioningSample"
    assert meta["field_map"] == {"image": "png", "caption": "txt"}
    # control: an input without one usable record writes nothing and exits 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "none.png", "caption": "x"}) + "\n")
    rc = preprocess_data.main(["--kind", "image-text", "--input", str(bad), "--output-dir",
                               str(tmp_path / "none"), "--no-progress"])
    assert rc == 2 and "no usable record (1 refused)" in capsys.readouterr().err


def test_vqa_records_get_the_vqa_sample_type(tmp_path):
    from megamoe.data.energon_write import prepare, write_shards

    jsonl = write_scenes_jsonl(str(tmp_path / "raw"), 3, kind="vqa")
    report = write_shards(jsonl, str(tmp_path / "s"), progress=False, log=lambda *_: None)
    prepare(str(tmp_path / "s"), report.sample_type, split_ratio="1,0,0")
    meta = yaml.safe_load((tmp_path / "s" / ".nv-meta" / "dataset.yaml").read_text())
    assert meta["sample_type"]["__class__"] == "VQASample"
    assert meta["field_map"]["context"] == "question.txt"


def _loader(path, image_size=32, part="train"):
    from megamoe.data.energon_source import EnergonSource

    source = EnergonSource(data_cfg(path, image_size=image_size), part, image_size=image_size,
                           image_tokens=16, seq_length=48, seed=1234, log=lambda *_: None)
    return source.make_loader(lambda batch, idx: (batch, idx), global_batch_size=4,
                              micro_batch_size=2, dp_rank=0, dp_size=1)


def test_a_sample_read_back_is_the_scenes_sample_of_its_scene(dataset):
    scenes = ScenesDataset(seed=0, image_size=32, tokenizer=scenes_tokenizer(), image_tokens=16,
                           seq_length=48, max_shapes=3, caption_fraction=1.0)
    batches = _loader(dataset).step_batches()
    compared = 0
    for batch, sample_index in batches:
        assert list(sample_index) == [2 * compared, 2 * compared + 1]
        for j, key in enumerate(batch["key"]):
            i = int(key.split("/")[1]) - 1                   # JSONL line -> scene index
            ref = scenes[i]
            for name, ours in (("tokens", batch["tokens"]), ("loss_mask", batch["loss_mask"]),
                               ("caption_tokens", batch["caption_tokens"]),
                               ("image", batch["images"])):
                np.testing.assert_array_equal(ours[j], ref[name], err_msg=name)
            assert batch["template"][j] == ref["template"] and batch["index"][j] == i + 1
            assert batch["caption_end"][j] == ref["caption_end"]
            # control: the neighbouring scene differs
            assert not np.array_equal(batch["images"][j], scenes[i + 1]["image"])
            assert not np.array_equal(batch["tokens"][j], scenes[i + 1]["tokens"])
        compared += 1
    assert compared == 2


def test_images_are_resized_to_the_model_image_size(dataset):
    batch, _ = _loader(dataset, image_size=16).step_batches()[0]
    images = np.asarray(batch["images"])        # Energon's loader hands numpy out as torch
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.uint8


def test_validation_batches_are_the_same_at_every_peek(dataset):
    valid = _loader(dataset, part="val")
    first = [b["key"] for b, _ in valid.peek(0)]
    assert [b["key"] for b, _ in valid.peek(0)] == first
    second = [b["key"] for b, _ in valid.peek(4)]
    assert second != first and all(k.startswith("shard-000002.tar/") for mb in first for k in mb)


def _check(overrides):
    from megamoe.config import load_config
    from megamoe.models.checks import check_config
    from megamoe.testing.parity import TINY_VLM

    check_config(load_config(None, [*TINY_VLM, "data.kind=energon", "model.seq_length=48",
                                    *overrides]), launch=False)


def test_config_checks_name_the_field(dataset, tmp_path):
    from megamoe.config.errors import ConfigError

    _check([f"data.path={dataset}"])                         # control: a prepared dataset
    with pytest.raises(ConfigError, match=r"^data\.path: required when data.kind is 'energon'"):
        _check([])
    with pytest.raises(ConfigError, match=r"^data\.path: .* is not a prepared Energon dataset"):
        _check([f"data.path={tmp_path}"])
    vqa = tmp_path / "vqa"
    from megamoe.data.energon_write import prepare, write_shards

    jsonl = write_scenes_jsonl(str(tmp_path / "raw"), 4, kind="vqa")
    prepare(str(vqa), write_shards(jsonl, str(vqa), samples_per_shard=2, progress=False,
                                   log=lambda *_: None).sample_type, split_ratio="1,1,0")
    _check([f"data.path={vqa}"])
    with pytest.raises(ConfigError, match=r"^model\.vlm\.contrastive_coeff: .* VQA samples"):
        _check([f"data.path={vqa}", "model.vlm.contrastive_coeff=0.1"])


def test_progress_line_shows_the_bad_sample_count():
    from megamoe.training.callbacks import _line

    m = {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0, "imbalance": 1.0}
    assert "bad samples 3" in _line(2, 4, {**m, "bad_samples": 3})
    assert "bad samples" not in _line(2, 4, {**m, "bad_samples": 0})


def test_a_state_saved_with_other_workers_is_refused(dataset):
    from megamoe.testing.energon_tasks import train_loader

    state = train_loader(dataset).state_dict()
    train_loader(dataset).load_state_dict(state)             # control: the same layout loads
    with pytest.raises(ValueError, match=r"\(num_workers 0 -> 1\)"):
        train_loader(dataset, num_workers=1).load_state_dict(state)


@pytest.mark.timeout(120)
def test_exact_resume_with_a_worker_process(dataset):
    from megamoe.testing.energon_tasks import train_loader

    a = train_loader(dataset, num_workers=1)
    a.step_batches()
    early = a.state_dict()
    a.step_batches()
    state = a.state_dict()
    straight = [a.step_batches() for _ in range(2)]
    b = train_loader(dataset, num_workers=1)
    b.load_state_dict(state)
    assert [b.step_batches() for _ in range(2)] == straight
    c = train_loader(dataset, num_workers=1)
    c.load_state_dict(early)                                  # control: another step's state
    assert [c.step_batches() for _ in range(2)] != straight
