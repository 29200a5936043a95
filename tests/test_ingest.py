"""Ingest stage: IDX -> versioned Parquet dataset, on real MNIST data and on broken inputs."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from admm_jobs import dataset, ingest, storage
from idx_files import (
    IDX_NAMES,
    REPO_ROOT,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    VENDORED_MNIST,
    idx_bytes,
    read_vendored,
    write_idx,
)

README_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
README_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def lake_files(lake):
    return sorted(p.relative_to(lake) for p in lake.rglob("*") if p.is_file())


def file_state(directory):
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def small_arrays():
    """The arrays held by the ``small_idx_source`` fixture."""
    return {
        TRAIN_IMAGES: read_vendored(TRAIN_IMAGES)[:1200],
        TRAIN_LABELS: read_vendored(TRAIN_LABELS)[:1200],
        TEST_IMAGES: read_vendored(TEST_IMAGES)[:400],
        TEST_LABELS: read_vendored(TEST_LABELS)[:400],
    }


def checksum_manifest(arrays):
    files = {
        name: {"sha256": hashlib.sha256(idx_bytes(array)).hexdigest(), "records": int(array.shape[0])}
        for name, array in arrays.items()
    }
    return {"format": ingest.CHECKSUMS_FORMAT, "files": files}


# ---------------------------------------------------------------- round trip


def test_small_round_trip_matches_the_idx_content(small_dataset, small_idx_source):
    root = storage.local_path(small_dataset["dataset_uri"])
    manifest = json.loads((root / dataset.MANIFEST_FILE).read_text())
    arrays = small_arrays()
    assert small_dataset["rows"] == {"train": 1000, "validation": 200, "test": 400}
    assert manifest["version"] == small_dataset["dataset_version"] == root.name
    assert manifest["format"] == "idx-parquet/1" and manifest["image_shape"] == [28, 28]

    for role, (name, _) in ingest.SOURCE_FILES.items():
        source = manifest["sources"][role]
        assert source["uri"] == str(small_idx_source / f"{name}.gz")
        assert source["sha256"] == hashlib.sha256(idx_bytes(arrays[name])).hexdigest()
        assert source["records"] == len(arrays[name])

    expected = {
        "train": (TRAIN_IMAGES, TRAIN_LABELS, 0, 1000),
        "validation": (TRAIN_IMAGES, TRAIN_LABELS, 1000, 1200),
        "test": (TEST_IMAGES, TEST_LABELS, 0, 400),
    }
    ids = {}
    for split, (images_name, labels_name, start, stop) in expected.items():
        entry = manifest["splits"][split]
        labels = arrays[labels_name][start:stop]
        assert entry["rows"] == stop - start
        assert entry["class_counts"] == np.bincount(labels, minlength=10).tolist()
        for file in entry["files"]:
            assert hashlib.sha256((root / file["path"]).read_bytes()).hexdigest() == file["sha256"]
        table = pq.read_table(root / entry["files"][0]["path"])
        assert table.schema.equals(dataset.PARQUET_SCHEMA)
        assert len(table) == file["rows"] == stop - start
        pixels = np.array(table.column("pixels").to_pylist(), dtype=np.uint8)
        np.testing.assert_array_equal(pixels, arrays[images_name][start:stop].reshape(-1, 784))
        np.testing.assert_array_equal(table.column("label").to_numpy(), labels)
        assert set(table.column("source_file").to_pylist()) == {images_name}
        assert table.column("source_index").to_pylist() == list(range(start, stop))
        ids[split] = table.column("image_id").to_pylist()
        assert ids[split][0] == hashlib.sha256(pixels[0].tobytes()).hexdigest()[:16]
        assert len(set(ids[split])) == len(ids[split])
    assert not set(ids["train"]) & set(ids["validation"])
    assert not set(ids["train"]) & set(ids["test"])


def test_splits_are_written_as_several_part_files(small_idx_source, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "ROWS_PER_FILE", 300)
    result = ingest.ingest_dataset(str(small_idx_source), str(tmp_path), validation_size=200)
    files = dataset.load_manifest(result["dataset_uri"])["splits"]["train"]["files"]
    assert [(f["path"], f["rows"]) for f in files] == [
        ("split=train/part-00000.parquet", 300),
        ("split=train/part-00001.parquet", 300),
        ("split=train/part-00002.parquet", 300),
        ("split=train/part-00003.parquet", 100),
    ]
    last = pq.read_table(storage.join(result["dataset_uri"], files[-1]["path"]))
    assert last.column("source_index").to_pylist() == list(range(900, 1000))


def test_rerun_reuses_the_dataset_untouched(small_idx_source, tmp_path):
    lake = tmp_path / "lake"
    first = ingest.ingest_dataset(str(small_idx_source), str(lake), validation_size=200)
    before = file_state(lake)
    second = ingest.ingest_dataset(str(small_idx_source), str(lake), validation_size=200)
    assert not first["reused"] and second["reused"]
    assert second["dataset_version"] == first["dataset_version"]
    assert file_state(lake) == before  # same bytes and same mtimes: nothing rewritten

    # The same content elsewhere, raw instead of gzip, gives the same version and byte-identical files.
    raw_source = tmp_path / "raw-source"
    for name, array in small_arrays().items():
        write_idx(raw_source / name, array, gzip=False)
    other_lake = tmp_path / "other-lake"
    third = ingest.ingest_dataset(str(raw_source), str(other_lake), validation_size=200)
    assert third["dataset_version"] == first["dataset_version"] and not third["reused"]
    parquet = {path: sha for path, (sha, _) in file_state(lake).items() if path.endswith(".parquet")}
    other_parquet = {path: sha for path, (sha, _) in file_state(other_lake).items() if path.endswith(".parquet")}
    assert parquet == other_parquet


def test_version_follows_content_and_validation_size(small_idx_source, small_dataset, tmp_path):
    other_split = ingest.ingest_dataset(str(small_idx_source), str(tmp_path / "a"), validation_size=300)
    assert other_split["dataset_version"] != small_dataset["dataset_version"]
    assert other_split["rows"] == {"train": 900, "validation": 300, "test": 400}

    changed = tmp_path / "changed"
    shutil.copytree(small_idx_source, changed)
    images = small_arrays()[TEST_IMAGES].copy()
    images[0, 0, 0] ^= 1
    write_idx(changed / f"{TEST_IMAGES}.gz", images)
    changed_result = ingest.ingest_dataset(str(changed), str(tmp_path / "b"), validation_size=200)
    assert changed_result["dataset_version"] not in (small_dataset["dataset_version"], other_split["dataset_version"])


def test_damaged_copy_is_rewritten(small_idx_source, tmp_path):
    result = ingest.ingest_dataset(str(small_idx_source), str(tmp_path), validation_size=200)
    root = storage.local_path(result["dataset_uri"])
    part = root / "split=test" / "part-00000.parquet"
    original = part.read_bytes()
    part.write_bytes(original[:-10])
    again = ingest.ingest_dataset(str(small_idx_source), str(tmp_path), validation_size=200)
    assert not again["reused"] and again["dataset_version"] == result["dataset_version"]
    assert part.read_bytes() == original


def test_gzip_is_detected_by_content_not_by_name(small_idx_source, small_dataset, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(small_idx_source, source)
    for name in IDX_NAMES:  # gzip bytes under the plain names
        (source / f"{name}.gz").rename(source / name)
    result = ingest.ingest_dataset(str(source), str(tmp_path / "lake"), validation_size=200)
    assert result["dataset_version"] == small_dataset["dataset_version"]


def test_main_prints_the_result_as_last_line(small_idx_source, tmp_path, capsys):
    lake = tmp_path / "lake"
    result = ingest.main(["--source", f"file://{small_idx_source}", "--lake", str(lake), "--validation-size", "200"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == result
    assert set(result) == {"dataset_uri", "dataset_version", "rows", "reused"}
    assert (storage.local_path(result["dataset_uri"]) / dataset.MANIFEST_FILE).is_file()


def test_command_line_fails_on_bad_input(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "admm_jobs.ingest", "--source", str(tmp_path / "nothing"), "--lake", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert completed.returncode != 0
    assert "IngestError" in completed.stderr and "missing file" in completed.stderr


def test_failure_while_writing_leaves_nothing_visible(small_idx_source, tmp_path, monkeypatch):
    real_parquet_bytes = ingest.parquet_bytes
    calls = []

    def fail_on_second_file(table):
        calls.append(len(table))
        if len(calls) == 2:
            raise OSError("disk full")
        return real_parquet_bytes(table)

    monkeypatch.setattr(ingest, "parquet_bytes", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        ingest.ingest_dataset(str(small_idx_source), str(tmp_path), validation_size=200)
    assert lake_files(tmp_path) == []
    assert [p.name for p in (tmp_path / "mnist").iterdir()] == []  # no staging directory left behind


# ---------------------------------------------------------------- bad inputs


def _rewrite(name, transform):
    """Mutation replacing the gzip file ``name`` by ``transform(uncompressed bytes)`` (raw bytes written)."""

    def mutate(source):
        path = source / f"{name}.gz"
        path.write_bytes(transform(gzip.decompress(path.read_bytes())))
        return path

    return mutate


def _replace_array(name, transform):
    def mutate(source):
        return write_idx(source / f"{name}.gz", transform(small_arrays()[name]))

    return mutate


def _gzip_bytes(name, transform):
    def mutate(source):
        path = source / f"{name}.gz"
        path.write_bytes(transform(path.read_bytes()))
        return path

    return mutate


def _delete(source):
    (source / f"{TEST_LABELS}.gz").unlink()
    return source / TEST_LABELS


def _same_file_twice(source):
    shutil.copy(source / f"{TRAIN_IMAGES}.gz", source / f"{TEST_IMAGES}.gz")
    shutil.copy(source / f"{TRAIN_LABELS}.gz", source / f"{TEST_LABELS}.gz")
    return source / f"{TEST_IMAGES}.gz"


def _checksum_mismatch(source):
    (source / ingest.CHECKSUMS_FILE).write_text(json.dumps(checksum_manifest(small_arrays())))

    def flip_one_pixel(images):
        images = images.copy()
        images[7, 14, 14] ^= 0xFF
        return images

    return _replace_array(TEST_IMAGES, flip_one_pixel)(source)


def _both_names(source):
    shutil.copy(source / f"{TRAIN_LABELS}.gz", source / TRAIN_LABELS)
    return source / TRAIN_LABELS


def _set_label(labels):
    labels = labels.copy()
    labels[5] = 10
    return labels


def _corrupt_crc(data):
    # The gzip trailer is CRC32 + size of the uncompressed data; a wrong CRC is corruption.
    return data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]


BAD_INPUTS = {
    "bad-magic": (_rewrite(TRAIN_IMAGES, lambda d: b"\x00\x00\x0d\x03" + d[4:]), "not an IDX file of unsigned bytes"),
    "wrong-dims": (_replace_array(TRAIN_IMAGES, lambda a: a.reshape(len(a), 784)), "declares 2 dimension(s)"),
    "labels-as-images": (_rewrite(TEST_IMAGES, lambda d: idx_bytes(small_arrays()[TEST_LABELS])), "magic 0x00000801"),
    "image-size-differs": (_replace_array(TEST_IMAGES, lambda a: a[:, :27, :27]), "images are (27, 27) pixels"),
    "count-mismatch": (_replace_array(TRAIN_LABELS, lambda a: a[:-1]), "1199 labels but"),
    "label-out-of-range": (_replace_array(TRAIN_LABELS, _set_label), "outside 0..9, first at record 5 (value 10)"),
    "truncated-data": (_rewrite(TEST_IMAGES, lambda d: d[:-100]), "truncated data"),
    "trailing-bytes": (_rewrite(TEST_LABELS, lambda d: d + b"\x00" * 7), "7 trailing bytes"),
    "empty": (_gzip_bytes(TRAIN_LABELS, lambda d: b""), "file is empty"),
    "empty-after-gunzip": (_gzip_bytes(TRAIN_LABELS, lambda d: gzip.compress(b"")), "file is empty"),
    "not-idx": (_gzip_bytes(TEST_LABELS, lambda d: b"<html>404 Not Found</html>\n"), "not an IDX file"),
    "gzip-truncated": (_gzip_bytes(TRAIN_IMAGES, lambda d: d[: len(d) // 2]), "truncated gzip stream"),
    "gzip-corrupt": (_gzip_bytes(TEST_IMAGES, _corrupt_crc), "corrupt gzip data"),
    "missing": (_delete, "missing file"),
    "same-file-twice": (_same_file_twice, "same content as"),
    "checksum-mismatch": (_checksum_mismatch, "checksum mismatch"),
    "both-raw-and-gz": (_both_names, "keep one"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_problem(case, small_idx_source, tmp_path):
    mutate, problem = BAD_INPUTS[case]
    source = tmp_path / "source"
    shutil.copytree(small_idx_source, source)
    bad_file = mutate(source)
    lake = tmp_path / "lake"
    with pytest.raises(ingest.IngestError) as info:
        ingest.ingest_dataset(str(source), str(lake), validation_size=200)
    message = str(info.value)
    assert str(bad_file) in message
    assert problem in message
    assert lake_files(lake) == []


def test_checksum_manifest_accepts_good_files_and_is_found_by_default(small_idx_source, small_dataset, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(small_idx_source, source)
    (source / ingest.CHECKSUMS_FILE).write_text(json.dumps(checksum_manifest(small_arrays())))
    result = ingest.ingest_dataset(str(source), str(tmp_path / "lake"), validation_size=200)
    assert result["dataset_version"] == small_dataset["dataset_version"]

    wrong_records = checksum_manifest(small_arrays())
    wrong_records["files"][TRAIN_LABELS]["records"] = 60000
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps(wrong_records))
    with pytest.raises(ingest.IngestError, match=f"1200 records, {explicit} expects 60000"):
        ingest.ingest_dataset(str(source), str(tmp_path / "lake2"), validation_size=200, checksums=str(explicit))

    explicit.write_text(json.dumps([wrong_records]))
    with pytest.raises(ingest.IngestError, match=f"{explicit}: not an idx-checksums/1 checksum manifest"):
        ingest.ingest_dataset(str(source), str(tmp_path / "lake2"), validation_size=200, checksums=str(explicit))
    assert lake_files(tmp_path / "lake2") == []


def test_validation_split_must_leave_training_rows(small_idx_source, tmp_path):
    with pytest.raises(ingest.IngestError, match="1200 records leave no training rows") as info:
        ingest.ingest_dataset(str(small_idx_source), str(tmp_path), validation_size=1200)
    assert str(small_idx_source / f"{TRAIN_IMAGES}.gz") in str(info.value)


@pytest.fixture
def http_source(small_idx_source, tmp_path):
    """``small_idx_source`` served over HTTP at ``/mnist``; yields (served directory, its URL)."""
    root = tmp_path / "www"
    served = root / "mnist"
    shutil.copytree(small_idx_source, served)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/mnist"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_source_requires_checksums(http_source, small_dataset, tmp_path):
    served, url = http_source
    lake = tmp_path / "lake"
    with pytest.raises(ingest.IngestError, match="checksums are mandatory for http") as info:
        ingest.ingest_dataset(url, str(lake), validation_size=200)
    assert f"{url}/{ingest.CHECKSUMS_FILE}" in str(info.value)
    assert lake_files(lake) == []

    (served / ingest.CHECKSUMS_FILE).write_text(json.dumps(checksum_manifest(small_arrays())))
    result = ingest.ingest_dataset(url, str(lake), validation_size=200)
    assert result["dataset_version"] == small_dataset["dataset_version"]
    manifest = dataset.load_manifest(result["dataset_uri"])
    assert manifest["sources"]["test_images"]["uri"] == f"{url}/{TEST_IMAGES}.gz"


# ---------------------------------------------------------------- S3 (moto server)


def test_s3_round_trip(s3_env, small_idx_source):
    bucket = s3_env
    client = boto3.client("s3")
    for path in small_idx_source.iterdir():
        client.put_object(Bucket=bucket, Key=f"raw/mnist/{path.name}", Body=path.read_bytes())
    result = ingest.ingest_dataset(f"s3://{bucket}/raw/mnist", f"s3://{bucket}/lake", validation_size=200)
    assert result["dataset_uri"] == f"s3://{bucket}/lake/mnist/{result['dataset_version']}"
    assert result["rows"] == {"train": 1000, "validation": 200, "test": 400}

    arrays = small_arrays()
    pixels, labels = dataset.read_split(result["dataset_uri"], "validation")
    np.testing.assert_array_equal(pixels, arrays[TRAIN_IMAGES][1000:1200].reshape(200, 784))
    np.testing.assert_array_equal(labels, arrays[TRAIN_LABELS][1000:1200])
    manifest = dataset.load_manifest(result["dataset_uri"])
    for entry in manifest["splits"]["test"]["files"]:
        body = client.get_object(Bucket=bucket, Key=f"lake/mnist/{result['dataset_version']}/{entry['path']}")["Body"]
        assert hashlib.sha256(body.read()).hexdigest() == entry["sha256"]

    again = ingest.ingest_dataset(f"s3://{bucket}/raw/mnist", f"s3://{bucket}/lake", validation_size=200)
    assert again["reused"] and again["dataset_version"] == result["dataset_version"]


def test_s3_failure_leaves_no_objects(s3_env, small_idx_source, monkeypatch):
    bucket = s3_env
    client = boto3.client("s3")
    for path in small_idx_source.iterdir():
        client.put_object(Bucket=bucket, Key=f"raw/{path.name}", Body=path.read_bytes())
    real_parquet_bytes = ingest.parquet_bytes
    calls = []

    def fail_on_third_file(table):
        calls.append(len(table))
        if len(calls) == 3:
            raise OSError("connection reset")
        return real_parquet_bytes(table)

    monkeypatch.setattr(ingest, "parquet_bytes", fail_on_third_file)
    with pytest.raises(OSError, match="connection reset"):
        ingest.ingest_dataset(f"s3://{bucket}/raw", f"s3://{bucket}/lake", validation_size=200)
    # pyarrow may leave empty "directory" markers (keys ending in "/"); no data object may remain.
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="lake/").get("Contents", [])]
    assert [key for key in keys if not key.endswith("/")] == []


# ---------------------------------------------------------------- full MNIST


def test_full_vendored_mnist(tmp_path):
    result = ingest.ingest_dataset(str(VENDORED_MNIST), str(tmp_path))  # verifies data/mnist/checksums.json
    assert result["rows"] == {"train": 55000, "validation": 5000, "test": 10000}
    manifest = dataset.load_manifest(result["dataset_uri"])
    splits = manifest["splits"]
    train_counts = np.add(splits["train"]["class_counts"], splits["validation"]["class_counts"])
    assert train_counts.tolist() == README_TRAIN_COUNTS
    assert splits["test"]["class_counts"] == README_TEST_COUNTS
    assert all(file["rows"] <= 10_000 for split in splits.values() for file in split["files"])
    assert len(splits["train"]["files"]) == 6
    readme = (VENDORED_MNIST / "README.md").read_text()
    assert all(source["sha256"] in readme for source in manifest["sources"].values())

    pixels, labels = dataset.read_split(result["dataset_uri"], "validation")
    np.testing.assert_array_equal(pixels, read_vendored(TRAIN_IMAGES)[55000:].reshape(5000, 784))
    np.testing.assert_array_equal(labels, read_vendored(TRAIN_LABELS)[55000:])
    all_ids = [
        image_id
        for split in dataset.SPLITS
        for uri in dataset.split_file_uris(result["dataset_uri"], split)
        for image_id in pq.read_table(uri, columns=["image_id"]).column("image_id").to_pylist()
    ]
    assert len(all_ids) == 70_000 and len(set(all_ids)) == 70_000  # MNIST has no byte-identical images
