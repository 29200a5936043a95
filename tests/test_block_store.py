"""The executor-local block store: generations, retries after a crash, lost state."""

import numpy as np
import pytest

from admm_jobs.trainer.block_store import BlockStateLost, BlockStore
from admm_jobs.trainer.loop import make_block


def _block(index=3, samples=5):
    rng = np.random.default_rng(index)
    return make_block(index, rng.integers(0, 256, (samples, 784), dtype=np.uint8), rng.integers(0, 10, samples), {
        "validation": (rng.integers(0, 256, (2, 784), dtype=np.uint8), np.array([1, 2], np.int8)),
        "test": (rng.integers(0, 256, (3, 784), dtype=np.uint8), np.array([3, 4, 5], np.int8))},
        rows={"train": (10, 40), "validation": (4, 8), "test": (6, 12)}, chunk_rows=2)


def _state(seed, samples=5):
    rng = np.random.default_rng(seed)
    return {"a": [rng.random((samples, 4), dtype=np.float32)],
            "z": [rng.random((samples, 4), dtype=np.float32), rng.random((samples, 10), dtype=np.float32)],
            "u": [rng.random((samples, 4), dtype=np.float32), rng.random((samples, 10), dtype=np.float32)]}


def _assert_blocks_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key == "evaluation":
            assert actual[key].keys() == value.keys()
            for split, arrays in value.items():
                for got, want in zip(actual[key][split], arrays):
                    np.testing.assert_array_equal(got, want)
                    assert got.dtype == want.dtype
        elif isinstance(value, list):
            assert len(actual[key]) == len(value)
            for got, want in zip(actual[key], value):
                np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_array_equal(actual[key], value)


def _generations(tmp_path, index=3):
    return sorted(path.name for path in (tmp_path / f"block-{index:05d}").glob("state-*"))


def test_data_and_every_state_generation_round_trip_exactly(tmp_path):
    store = BlockStore(tmp_path)
    block = _block()
    store.save_data(block)
    _assert_blocks_equal(store.load(3, 0), block)
    for generation in (1, 2):
        updated = {**block, **_state(generation)}
        store.save_state(updated, generation)
        _assert_blocks_equal(store.load(3, generation), updated)


def test_old_generations_are_dropped_but_the_previous_one_is_kept_for_retries(tmp_path):
    store = BlockStore(tmp_path)
    block = _block()
    store.save_data(block)
    for generation in range(1, 5):
        store.save_state({**block, **_state(generation)}, generation)
    assert _generations(tmp_path) == ["state-000003", "state-000004"]
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


def test_a_task_retried_after_writing_its_result_reads_the_same_input_and_rewrites_the_same_output(tmp_path):
    store = BlockStore(tmp_path)
    store.save_data(_block())
    store.save_state({**_block(), **_state(1)}, 1)
    # attempt 1 of the pass reading generation 1 wrote generation 2, then its worker died before reporting
    first_input = store.load(3, 1)
    store.save_state({**first_input, **_state(2)}, 2)
    retry_input = store.load(3, 1)
    _assert_blocks_equal(retry_input, first_input)
    # the retry's write finds a complete generation 2 (the same result, for a deterministic pass) and keeps it
    store.save_state({**retry_input, **_state(99)}, 2)
    _assert_blocks_equal(store.load(3, 2), {**_block(), **_state(2)})
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


def test_state_a_pass_left_unchanged_is_linked_not_copied(tmp_path):
    """A pass that replaces one array of the state writes that one; the others are hard links to the previous
    generation's files, and dropping the older generation leaves them readable."""
    store = BlockStore(tmp_path)
    store.save_data(_block())
    store.save_state({"index": 3, **_state(1)}, 1)
    store = BlockStore(tmp_path)  # a new task, as on an executor
    loaded = store.load(3, 1)
    replaced = np.full((5, 10), 7.0, np.float32)
    store.save_state(dict(loaded, u=[loaded["u"][0], replaced]), 2)
    state = tmp_path / "block-00003"
    first = {name: (state / "state-000001" / name).stat().st_ino for name in ("a.0.npy", "u.1.npy")}
    second = {name: (state / "state-000002" / name).stat().st_ino for name in ("a.0.npy", "u.1.npy")}
    assert second["a.0.npy"] == first["a.0.npy"] and second["u.1.npy"] != first["u.1.npy"]
    for generation in (3, 4):  # generations 1 and 2 are dropped on the way
        store = BlockStore(tmp_path)
        store.save_state(store.load(3, generation - 1), generation)
    assert sorted(path.name for path in state.glob("state-*")) == ["state-000003", "state-000004"]
    assert {name: (state / "state-000004" / name).stat().st_ino for name in second} == second
    block = BlockStore(tmp_path).load(3, 4)
    np.testing.assert_array_equal(block["a"][0], _state(1)["a"][0])
    np.testing.assert_array_equal(block["u"][1], replaced)


def test_missing_state_names_the_block_and_the_file(tmp_path):
    store = BlockStore(tmp_path)
    store.save_data(_block())
    with pytest.raises(BlockStateLost, match=r"block 3: .*state-000001 is not on host"):
        store.load(3, 1)
    store.remove(3)
    with pytest.raises(BlockStateLost, match=r"block 3: .*block-00003/data is not on host"):
        store.load(3, 0)
    assert not (tmp_path / "block-00003").exists()
