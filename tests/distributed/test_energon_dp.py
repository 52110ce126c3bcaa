"""data.kind energon under DP2 (2 gloo ranks): shards written by tools/preprocess_data.py's writer,
damaged five ways (a truncated image, a missing caption file, a truncated shard, a shard that is
not a tar, a shard with a sample's tar header overwritten mid-file). Skipping: every rank's
micro-batches stay full, each bad sample or shard is logged once with its shard/key and reason
and counted (summed over ranks), and no damaged sample reaches a batch. Strict: every rank stops
with the same one-line error naming the shard, key and reason (a rank whose own data is fine
does not hang in a collective). Resume (unpacked and packed: Energon's packing buffer is in its
state): the loader state saved in a checkpoint (one object per DP rank) gives exactly the keys
an uninterrupted reader gets; the state of an earlier step (control) does not; a DP1 reader
refuses a DP2 state, saying what changed."""

import os

import pytest

from megamoe.testing.energon_tasks import (B, DAMAGE, G, build_dataset, damaged_copy,
                                           read_steps, resume_round_trip, train_loader)
from megamoe.testing.pool import run_distributed

STEPS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("energon_dp"))
    return run_distributed(build_dataset, 2, folder)[0]


@pytest.mark.timeout(300)
def test_bad_samples_and_shards_are_skipped_counted_and_batches_stay_full(dataset, tmp_path):
    named = damaged_copy(dataset, str(tmp_path / "d"), DAMAGE)
    out = run_distributed(read_steps, 2, str(tmp_path / "d"), STEPS)
    lines = [ln for r in out for ln in r["lines"]]
    seen = [k for r in out for step in r["keys"] for mb in step for k in mb]
    for r in out:
        assert [len(mb) for step in r["keys"] for mb in step] == [B] * (STEPS * G // (2 * B))
        assert r["bad_total"] == sum(x["bad"] for x in out)
    for kind, name in zip(DAMAGE, named):
        what = "shard" if "shard" in kind else "sample"
        hits = [ln for ln in lines if ln.startswith(f"bad {what} {name}:")]
        # a shard: one line (DP rank 0, at start); a sample: a line each time it is met
        assert (len(hits) == 1) if what == "shard" else hits, (kind, lines)
        assert not any(k == name or k.startswith(name + "/") for k in seen), (kind, name)
    assert any("image file is truncated" in ln for ln in lines)
    assert any("no 'txt' file" in ln for ln in lines)
    assert any("truncated (" in ln for ln in lines) and any("not a tar file" in ln for ln in lines)
    assert any("no tar header at byte " in ln for ln in lines)
    # the count: 8 samples per damaged shard (once, by DP rank 0) + one per logged bad sample
    sample_lines = [ln for ln in lines if ln.startswith("bad sample ")]
    assert out[0]["bad_total"] == 3 * 8 + len(sample_lines), (out[0]["bad_total"], lines)
    # control: the undamaged dataset logs nothing and counts nothing, and reads those keys
    clean = run_distributed(read_steps, 2, dataset, STEPS)
    assert clean[0]["bad_total"] == 0 and not any(r["lines"] for r in clean)
    clean_keys = {k for r in clean for step in r["keys"] for mb in step for k in mb}
    assert any(k.startswith(named[0].split("/")[0]) for k in clean_keys)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", DAMAGE)
def test_strict_mode_stops_every_rank_with_one_error(dataset, tmp_path, kind):
    path = str(tmp_path / "d")
    name, = damaged_copy(dataset, path, [kind])
    out = run_distributed(read_steps, 2, path, 2 * STEPS, strict=True)
    errors = [r.get("error") for r in out]
    assert errors[0] is not None and errors[0] == errors[1], out
    assert errors[0].startswith("data.strict: bad ") and "every rank stopped" in errors[0]
    assert name in errors[0] and "\n" not in errors[0]
    reason = {"truncated_image": "image file is truncated", "missing_caption": "no 'txt' file",
              "truncated_shard": "truncated (", "unreadable_shard": "not a tar file",
              "corrupt_shard": "no tar header at byte"}[kind]
    assert reason in errors[0], errors[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_exact_resume_from_a_checkpoint_and_changed_dp_size_refused(dataset, tmp_path, packing):
    out = run_distributed(resume_round_trip, 2, dataset, str(tmp_path / "ckpt"), 3, 3,
                          packing=packing)
    for r in out:
        if packing:     # rows of greedily packed samples (keys…, the row's tokens)
            assert any(len(row) > 2 for step in r["straight"] for mb in step for row in mb)
        assert r["resumed"] == r["straight"], r
        assert r["control"] != r["straight"]        # restoring another step's state differs
        assert r["consumed"] == 6 * G
    assert out[0]["straight"] != out[1]["straight"]  # the ranks read disjoint streams
    # a DP1 reader refuses the DP2 state (which holds no cursor for a DP size of 1)
    loader = train_loader(dataset, packing=packing)
    with pytest.raises(ValueError, match=r"dp_size 2 -> 1") as err:
        loader.load_state_dict(out[0]["data"])
    assert "start fresh" in str(err.value) and "\n" not in str(err.value)
    assert os.path.isdir(tmp_path / "ckpt")
