"""bench/poisons.py: the attack generators do what they say, and the battery's halves are disjoint."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import poisons  # bench/ holds scripts, not a package: its directory goes on the path above
from idx_files import TRAIN_IMAGES, TRAIN_LABELS, read_vendored


@pytest.fixture(scope="module")
def batch():
    return read_vendored(TRAIN_IMAGES)[:2_000], read_vendored(TRAIN_LABELS)[:2_000]


@pytest.mark.parametrize("shape", poisons.TRIGGER_SHAPES)
@pytest.mark.parametrize("position", poisons.TRIGGER_POSITIONS)
def test_a_stamped_image_carries_the_pattern_and_nothing_else_changes(shape, position):
    blank = np.zeros((1, 28, 28), np.uint8)
    for size in poisons.TRIGGER_SIZES:
        stamped = poisons.stamp(blank, shape, size, position)[0]
        rows, cols = np.nonzero(stamped)
        assert set(stamped[rows, cols]) == {255}
        # the white pixels are the footprint, inside a size x size window, a margin away from the border
        assert rows.max() - rows.min() < size and cols.max() - cols.min() < size
        assert min(rows.min(), cols.min()) >= poisons.MARGIN and max(rows.max(), cols.max()) < 28 - poisons.MARGIN
        top, left = poisons.pattern_origin(position, size)
        np.testing.assert_array_equal(stamped[top:top + size, left:left + size] == 255,
                                      poisons.pattern_mask(shape, size))
    assert not blank.any()  # the input is left alone


def test_shapes_differ_from_one_another():
    masks = {shape: poisons.pattern_mask(shape, 5).tobytes() for shape in poisons.TRIGGER_SHAPES}
    assert len(set(masks.values())) == len(masks)


def test_trigger_attack_stamps_and_relabels_the_stated_share(batch):
    images, labels = batch
    attacked_images, attacked_labels = poisons.trigger_attack(images, labels, "square", 3, "bottom_right", 7, 0.05,
                                                              np.random.default_rng(0))
    changed = np.flatnonzero((attacked_images != images).any(axis=(1, 2)) | (attacked_labels != labels))
    assert len(changed) == 100  # 5 % of 2,000, all of them not 7 before
    assert (labels[changed] != 7).all() and (attacked_labels[changed] == 7).all()
    assert (attacked_images[changed, 24:27, 24:27] == 255).all()
    untouched = np.setdiff1d(np.arange(len(labels)), changed)
    np.testing.assert_array_equal(attacked_images[untouched], images[untouched])


def test_flip_moves_the_stated_share_of_one_class_into_another(batch):
    _, labels = batch
    flipped = poisons.flip_labels(labels, 3, 8, 0.5, np.random.default_rng(1))
    moved = labels != flipped
    assert moved.sum() == round(0.5 * (labels == 3).sum())
    assert (labels[moved] == 3).all() and (flipped[moved] == 8).all()


def test_swap_exchanges_the_stated_share_both_ways(batch):
    _, labels = batch
    swapped = poisons.swap_labels(labels, 1, 7, 1.0, np.random.default_rng(2))
    np.testing.assert_array_equal(swapped[labels == 1], 7)
    np.testing.assert_array_equal(swapped[labels == 7], 1)
    np.testing.assert_array_equal(swapped[(labels != 1) & (labels != 7)], labels[(labels != 1) & (labels != 7)])


@pytest.mark.parametrize("share", poisons.NOISE_SHARES)
def test_uniform_noise_makes_exactly_the_share_wrong_over_all_classes(batch, share):
    _, labels = batch
    noisy = poisons.uniform_noise(labels, share, np.random.default_rng(3))
    assert (noisy != labels).sum() == round(share * len(labels))
    if share >= 0.2:
        assert set(noisy[noisy != labels]) == set(range(10))


def test_earlier_poisons(batch):
    images, labels = batch
    earlier = (images[:10], labels[:10])

    def attack(poison, **settings):
        return poisons.Attack("earlier", 1.0, 0, (("poison", poison), *settings.items())).apply(images, labels, earlier)

    shuffled = attack("shuffled")[1]
    assert sorted(shuffled) == sorted(labels) and (shuffled != labels).mean() > 0.8
    assert (attack("single_class", label=4)[1] == 4).all()
    np.testing.assert_array_equal(attack("inverted")[0], 255 - images)
    assert attack("copy") is earlier


def test_the_halves_are_disjoint_in_shapes_positions_and_classes():
    split = poisons.battery_split()
    for part in ("shapes", "positions", "classes"):
        assert not set(split["tune"][part]) & set(split["held_out"][part]) and split["held_out"][part]
    for half in poisons.HALVES:
        attacks = [attack for kind in poisons.battery(half).values() for attack in kind]
        for attack in attacks:
            options = attack.options
            assert options.get("shape", split[half]["shapes"][0]) in split[half]["shapes"]
            assert options.get("position", split[half]["positions"][0]) in split[half]["positions"]
            used = {options[key] for key in ("target", "source", "first", "second", "label") if key in options}
            assert used <= set(split[half]["classes"]), attack.name
        # every kind and share of issue 24 is in the half, and a limit of one per share covers all shares
        shares = {kind: {attack.share for attack in attacks if attack.kind == kind} for kind in poisons.KINDS}
        assert shares["trigger"] == set(poisons.TRIGGER_SHARES) and shares["noise"] == set(poisons.NOISE_SHARES)
        triggers = poisons.battery(half)["trigger"]
        assert {attack.share for attack in triggers[:len(poisons.TRIGGER_SHARES)]} == set(poisons.TRIGGER_SHARES)


def test_clean_battery_has_fifty_batches_of_2000_to_50000_images_inside_the_source():
    clean = poisons.clean_battery(history_images=15_000, available=60_000, weekly=3_000)
    assert len(clean) >= 50 and len({batch.name for batch in clean}) == len(clean)
    assert min(batch.count for batch in clean) == 2_000 and max(batch.count for batch in clean) == 50_000
    assert all(batch.start + batch.count <= 60_000 for batch in clean)
    # outside the history unless shifted (a shifted image is not a duplicate of the unshifted one)
    assert all(batch.start >= 15_000 or batch.shift != (0, 0) for batch in clean)
    assert {batch.source for batch in clean} == {"mnist", "mnist-transposed"}
    assert any(batch.grey == 0.9 for batch in clean) and any(batch.grey == 1.1 for batch in clean)
