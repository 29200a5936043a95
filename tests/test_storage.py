"""Storage by URI: atomic directory publication under concurrency, .gz bytes kept as they are."""

from __future__ import annotations

import gzip
import threading

import pytest

from admm_jobs.lake import storage


def test_concurrent_staged_directories_never_expose_a_partial_one(tmp_path):
    final = tmp_path / "outputs"
    errors = []

    def writer(name: str) -> None:
        try:
            for round_ in range(15):
                with storage.staged_directory(str(final)) as staging:
                    for part in range(5):
                        storage.write_bytes(storage.join(staging, f"part-{part}"), f"{name}:{round_}".encode())
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    contents = {(final / f"part-{part}").read_text() for part in range(5)}
    assert len(contents) == 1  # all five files come from the same writer's same round
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # no staging or retired leftovers


def test_a_failed_stage_leaves_the_previous_directory(tmp_path):
    final = tmp_path / "outputs"
    with storage.staged_directory(str(final)) as staging:
        storage.write_bytes(storage.join(staging, "a"), b"old")
    with pytest.raises(RuntimeError):
        with storage.staged_directory(str(final)) as staging:
            storage.write_bytes(storage.join(staging, "a"), b"new")
            raise RuntimeError("boom")
    assert (final / "a").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


def test_gzip_files_are_read_and_written_byte_for_byte(tmp_path, s3_env):
    payload = gzip.compress(b"idx bytes")
    for uri in (str(tmp_path / "f.gz"), f"s3://{s3_env}/f.gz"):
        storage.write_bytes(uri, payload)
        assert storage.read_bytes(uri) == payload
