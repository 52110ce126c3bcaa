"""The shapes image generator: each image a pure function of (seed, global index), labels that
match what is drawn, disjoint splits, one-line errors, and a task a simple classifier can learn
(with shuffled labels as the negative control)."""

import hashlib
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megamoe.config.errors import ConfigError
from megamoe.data.shapes import (COLOURS, KINDS, MAX_CLASSES, VALID_BASE, ShapesDataset,
                                 build_shapes_datasets, check_patch_grid, class_kind_colour,
                                 main, render_image)

ROOT = pathlib.Path(__file__).resolve().parents[2]
_DIGEST = ("import hashlib, numpy as np; from megamoe.data.shapes import ShapesDataset; "
           "x, y = ShapesDataset(3, num_samples=50, split='valid').get_batch(np.arange(50)); "
           "print(hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest())")


def test_same_seed_and_index_same_bytes_also_in_another_process():
    a = ShapesDataset(3, num_samples=50, split="valid")
    x, y = a.get_batch(np.arange(50))
    assert x.shape == (50, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    x2, y2 = ShapesDataset(3, num_samples=50, split="valid").get_batch(np.arange(50)[::-1])
    assert np.array_equal(x, x2[::-1]) and np.array_equal(y, y2[::-1])    # order-free access
    single, label = a[17]
    assert np.array_equal(single, x[17]) and label == y[17]
    out = subprocess.run([sys.executable, "-c", _DIGEST], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


def test_different_indices_and_seeds_differ():
    x, _ = ShapesDataset(0, num_samples=64).get_batch(np.arange(64))
    flat = x.reshape(64, -1)
    assert len({row.tobytes() for row in flat}) == 64
    other, _ = ShapesDataset(1, num_samples=64).get_batch(np.arange(64))
    assert (other != x).any(axis=(1, 2, 3)).all()


def test_every_class_appears_and_the_drawn_colour_matches_the_label():
    data = ShapesDataset(0, num_classes=MAX_CLASSES, num_samples=400)
    palette = np.array(list(COLOURS.values()), float)
    seen = set()
    for i in range(len(data)):
        image, label = data[i]
        d = data.describe(i)
        assert (d["label"], (d["kind"], d["colour"])) == (label, class_kind_colour(label))
        assert d["index"] == i
        seen.add(label)
        if d["kind"] == "ring":                      # the centre of a ring is background
            continue
        x, y = (int(v) for v in d["center"])
        nearest = np.abs(palette - image[:, y, x].astype(float)).sum(1).argmin()
        assert list(COLOURS)[nearest] == d["colour"], (i, d)
    assert seen == set(range(MAX_CLASSES))
    assert {class_kind_colour(c) for c in range(MAX_CLASSES)} == {
        (k, c) for k in KINDS for c in COLOURS}


def test_fewer_classes_and_other_sizes():
    x, y = ShapesDataset(0, image_size=64, num_classes=10, num_samples=200).get_batch(
        np.arange(200))
    assert x.shape == (200, 3, 64, 64) and set(y.tolist()) == set(range(10))
    small, _ = ShapesDataset(0, image_size=16, num_samples=4)[0]
    assert small.shape == (3, 16, 16)


def test_splits_are_disjoint_index_ranges_that_do_not_move_when_a_split_grows():
    train, valid, n = build_shapes_datasets(5, num_train=100, num_valid=20)
    assert (len(train), len(valid), n) == (100, 20, 12)
    assert valid.describe(0)["index"] == VALID_BASE and train.describe(99)["index"] == 99
    bigger_train, bigger_valid, _ = build_shapes_datasets(5, num_train=1000, num_valid=40)
    assert np.array_equal(bigger_valid[3][0], valid[3][0])
    assert np.array_equal(bigger_train[3][0], train[3][0])
    assert np.array_equal(valid[3][0], render_image(5, VALID_BASE + 3)[0])
    assert not np.array_equal(valid[3][0], train[3][0])
    with pytest.raises(IndexError):
        train[100]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=40), r"^data\.num_classes: 40 > 24 the shapes generator can make"),
    (dict(num_classes=1), r"^data\.num_classes: must be an integer >= 2"),
    (dict(image_size=8), r"^data\.image_size: must be an integer >= 16"),
])
def test_bad_dataset_arguments_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_shapes_datasets(0, **{"num_train": 10, "num_valid": 10, **kwargs})


def test_patch_grid_check():
    check_patch_grid(32, 4)
    check_patch_grid(32, 32)
    with pytest.raises(ValueError, match=r"^model\.vit\.patch_size: 5 does not divide "
                                         r"data\.image_size 32$"):
        check_patch_grid(32, 5)
    with pytest.raises(ValueError, match=r"^model\.vit\.patch_size: must be"):
        check_patch_grid(32, 0)
    with pytest.raises(ValueError, match=r"^data\.image_size: must be"):
        check_patch_grid(12, 4)


def _features(x_BCHW: np.ndarray) -> np.ndarray:
    """Translation-invariant features: |FFT| of the saturation map (the shape stands out of the
    grey background) and the saturation-weighted mean colour."""
    x = x_BCHW.astype(np.float64) / 255
    sat_BHW = x.max(1) - x.min(1)
    spectrum = np.log1p(np.abs(np.fft.rfft2(sat_BHW))).reshape(len(x), -1)
    w_BHW = sat_BHW / sat_BHW.sum((1, 2), keepdims=True)
    colour_BC = (x * w_BHW[:, None]).sum((2, 3))
    return np.concatenate([spectrum, 10 * colour_BC], 1)


def _nearest_class_mean(f_train, y_train, f_test, num_classes):
    means = np.stack([f_train[y_train == c].mean(0) for c in range(num_classes)])
    return ((f_test[:, None] - means[None]) ** 2).sum(-1).argmin(1)


def test_learnable_well_above_chance_and_not_with_shuffled_labels():
    train, valid, n = build_shapes_datasets(0, num_train=600, num_valid=300)
    x_train, y_train = train.get_batch(np.arange(600))
    x_valid, y_valid = valid.get_batch(np.arange(300))
    f_train, f_valid = _features(x_train), _features(x_valid)
    chance = 1 / n
    acc = (_nearest_class_mean(f_train, y_train, f_valid, n) == y_valid).mean()
    assert acc >= 5 * chance, acc                                   # ≈ 0.73 measured
    shuffled = np.random.default_rng(0).permutation(y_train)        # negative control
    acc_shuffled = (_nearest_class_mean(f_train, shuffled, f_valid, n) == y_valid).mean()
    assert acc_shuffled <= 2 * chance, acc_shuffled


def test_contact_sheet_writes_a_png(tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(["--grid", str(out), "--num-classes", "10", "--per-class", "2", "--scale", "2"])
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == (2 * (64 + 2) + 2, 10 * (64 + 2) + 2)
    assert "red/circle" in capsys.readouterr().out
