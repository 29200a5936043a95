"""Transient and deterministic storage failures told apart, on the S3 test server with faults injected over HTTP.

A :class:`fault_proxy.FaultProxy` sits between the S3 clients (pyarrow in ``storage``, boto3 in the registry)
and the moto server. Its faults outlast the clients' own retries, which ``AWS_MAX_ATTEMPTS=2`` keeps short:
what remains is what the Airflow task sees. Transient failures must reach Airflow unchanged (the task's
retries apply); deterministic ones as ``AirflowFailException`` (no retry).
"""

from __future__ import annotations

import itertools
import json

import boto3
import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowFailException

from admm_jobs import evaluate
from admm_jobs.lake import dataset, idx, storage
from admm_jobs.operations.ports import free_port
from admm_jobs.orchestration import tasks
from admm_jobs.orchestration.failures import fail_fast
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry

from conftest import ALLOWED_URI_ROOTS
from fault_proxy import DROP, INTERNAL_ERROR, SLOW_DOWN, STALL, Answer, FaultProxy
from run_artifacts import make_evaluated_run

ACCESS_DENIED = Answer(403, "AccessDenied", "Access Denied")


@pytest.fixture
def s3(s3_server, s3_env, monkeypatch):
    """(proxy, bucket): every S3 client goes through a fault proxy and tries each request twice; the task
    callables may use the bucket."""
    monkeypatch.setenv(ALLOWED_URI_ROOTS, f"s3://{s3_env}")
    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        monkeypatch.setenv("AWS_RETRY_MODE", "standard")
        yield proxy, s3_env


def publish_argv(run_uri: str, registry_uri: str) -> list[str]:
    return ["--run-uri", run_uri, "--registry-uri", registry_uri, "--min-accuracy", "0.5"]


def is_conditional(method, path, headers) -> bool:
    return method == "PUT" and ("If-Match" in headers or "If-None-Match" in headers)


@pytest.mark.parametrize("fault", [SLOW_DOWN, INTERNAL_ERROR, DROP], ids=["503 SlowDown", "500", "reset"])
def test_throttling_server_errors_and_resets_outlast_the_clients_retries_as_transient_errors(s3, fault):
    proxy, bucket = s3
    uri = f"s3://{bucket}/registry/mnist-admm/current.json"
    storage.write_bytes(uri, b'{"version": "v1", "test_accuracy": 0.9}')
    proxy.fail(fault)
    with pytest.raises(storage.TransientStorageError, match="cannot read"):
        storage.read_bytes(uri)  # pyarrow
    # pyarrow retried, as AWS_MAX_ATTEMPTS allows (unset: some 30 attempts in 6 s; curl may reconnect once more
    # on a reset), and the fault outlasted it
    assert 2 <= len(proxy.faulted) <= 3
    with pytest.raises(registry.TransientRegistryError, match="cannot read"):
        registry.read_pointer(f"s3://{bucket}/registry")  # boto3

    proxy.clear()
    for method in ("PUT", "POST"):  # reads pass, writes (single or multipart) fail
        proxy.fail(fault, method=method)
    with pytest.raises(storage.TransientStorageError, match="cannot write"):
        storage.write_bytes(f"s3://{bucket}/other.json", b"{}")
    with pytest.raises(registry.TransientRegistryError, match="cannot write"):
        registry.record_decision(f"s3://{bucket}/registry", {"decision": "skipped"})

    proxy.clear()  # what the task's retry sees once the store recovers
    assert registry.read_pointer(f"s3://{bucket}/registry")["version"] == "v1"
    assert json.loads(storage.read_bytes(uri))["version"] == "v1"


def test_a_chunked_read_that_meets_a_transient_failure_stays_retryable(s3, small_dataset):
    """Evaluate reads the lake chunk by chunk; a throttled open or a read that fails after the open is a
    dataset error the task retries, and the rows come back once the store recovers."""
    proxy, bucket = s3
    local = dataset.split_file_uris(small_dataset["dataset_uri"], "test")[0]
    uri = f"s3://{bucket}/lake/part-00000.parquet"
    storage.write_bytes(uri, storage.read_bytes(local))
    for method in (None, "GET"):  # every request (the open's look-up first), or only the reads of the body
        proxy.fail(SLOW_DOWN, method=method)
        with pytest.raises(dataset.DatasetError, match=uri) as info:
            list(dataset.iter_file_chunks([uri], chunk_rows=100))
        assert storage.is_retryable(info.value)
        proxy.clear()
    chunks = list(dataset.iter_file_chunks([uri], chunk_rows=100))
    labels = np.concatenate([chunk for _, chunk in chunks])
    np.testing.assert_array_equal(labels, dataset.read_parquet_file(local)[1])


def test_a_transient_registry_error_is_still_a_registry_error(s3):
    proxy, bucket = s3
    proxy.fail(SLOW_DOWN)
    with pytest.raises(registry.RegistryError) as failure:  # what the report plugin's page catches
        registry.read_history(f"s3://{bucket}/registry")
    assert storage.is_retryable(failure.value)


def test_a_stalled_answer_times_out_as_a_transient_error(s3, monkeypatch):
    proxy, bucket = s3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # pyarrow gives up on a silent server after 3 s per attempt
    storage.write_bytes(f"s3://{bucket}/slow.json", b"{}")
    proxy.fail(STALL)
    with pytest.raises(storage.TransientStorageError, match="Timeout"):
        storage.read_bytes(f"s3://{bucket}/slow.json")


@pytest.mark.parametrize("endpoint", ["refused", "http://no-such-host.invalid:9000"])
def test_refused_connections_and_unknown_hosts_are_transient(s3_env, monkeypatch, endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}" if endpoint == "refused" else endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.TransientStorageError):
        storage.exists(f"s3://{s3_env}/any.json")
    with pytest.raises(registry.TransientRegistryError):
        registry.read_pointer(f"s3://{s3_env}/registry")


def test_missing_invalid_and_forbidden_objects_are_deterministic(s3):
    proxy, bucket = s3
    storage.write_bytes(f"s3://{bucket}/bad.json", b"{not json")
    for call, message in [(lambda: storage.read_bytes(f"s3://{bucket}/missing.json"), "no such file"),
                          (lambda: storage.read_json(f"s3://{bucket}/bad.json"), "not valid JSON")]:
        with pytest.raises(storage.StorageError, match=message) as failure:
            call()
        assert not storage.is_retryable(failure.value)
    proxy.fail(ACCESS_DENIED)
    with pytest.raises(storage.StorageError, match="ACCESS_DENIED") as denied:
        storage.read_bytes(f"s3://{bucket}/bad.json")
    with pytest.raises(registry.RegistryError, match="AccessDenied") as denied_registry:
        registry.read_pointer(f"s3://{bucket}/registry")
    assert not storage.is_retryable(denied.value) and not storage.is_retryable(denied_registry.value)


def rival_writer(proxy: FaultProxy, s3_server: str, bucket: str, key: str, content) -> None:
    """Another writer that replaces ``key`` (with ``content(n)`` the n-th time) straight on the server just before
    each of our conditional PUTs of it reaches the server, which then refuses ours (412) on its own."""
    client = boto3.client("s3", endpoint_url=s3_server)
    counter = itertools.count()
    proxy.fail(lambda: client.put_object(Bucket=bucket, Key=key, Body=content(next(counter))), key=key,
               when=is_conditional)


def test_history_contention_beyond_max_attempts_is_transient(s3, s3_server):
    proxy, bucket = s3
    registry_uri = f"s3://{bucket}/registry"
    key = "registry/mnist-admm/history.jsonl"

    def rival_history(n: int) -> bytes:  # the rival's n-th write holds n + 1 lines of its own
        return "".join(json.dumps({"decision": "skipped", "training_key": f"rival-{i}"}) + "\n"
                       for i in range(n + 1)).encode()

    rival_writer(proxy, s3_server, bucket, key, rival_history)

    with pytest.raises(registry.TransientRegistryError, match=f"after {registry.MAX_ATTEMPTS} concurrent"):
        registry.record_decision(registry_uri, {"decision": "skipped", "training_key": "ours"})
    assert len(registry.read_history(registry_uri)) == registry.MAX_ATTEMPTS  # every attempt lost to a rival

    proxy.clear()
    registry.record_decision(registry_uri, {"decision": "skipped", "training_key": "ours"})
    assert registry.read_history(registry_uri)[-1]["training_key"] == "ours"


def test_publish_keeps_transient_failures_retryable(s3, tmp_path):
    proxy, bucket = s3
    registry_uri = f"s3://{bucket}/registry"
    run_uri = f"s3://{bucket}/runs/r1"
    version = make_evaluated_run(run_uri, seed=1, test_accuracy=0.9)
    publish = fail_fast(tasks.publish_task)

    proxy.fail(SLOW_DOWN, key="current.json")  # the registry's pointer (boto3)
    with pytest.raises(registry.TransientRegistryError):
        publish(publish_argv(run_uri, registry_uri))
    proxy.clear()
    proxy.fail(INTERNAL_ERROR, key="model/model.json")  # the run's model, read through pyarrow by load_model
    with pytest.raises(model_io.ModelError) as failure:  # the stage's own error, raised from the transient one
        publish(publish_argv(run_uri, registry_uri))
    assert isinstance(failure.value.__cause__, storage.TransientStorageError)

    proxy.clear()
    assert publish(publish_argv(run_uri, registry_uri))["decision"] == "accepted"
    assert registry.read_pointer(registry_uri)["version"] == version


def test_pointer_contention_beyond_max_attempts_is_retryable_and_clears(s3, s3_server):
    proxy, bucket = s3
    registry_uri = f"s3://{bucket}/registry"
    run_uri = f"s3://{bucket}/runs/r1"
    version = make_evaluated_run(run_uri, seed=1, test_accuracy=0.9)

    def rival_pointer(n: int) -> bytes:  # a valid pointer, different each time (so is its ETag)
        return json.dumps({"version": "f" * 16, "test_accuracy": 0.5, "published_at": n}).encode()

    rival_writer(proxy, s3_server, bucket, "registry/mnist-admm/current.json", rival_pointer)
    publish = fail_fast(tasks.publish_task)

    with pytest.raises(registry.TransientRegistryError, match=f"after {registry.MAX_ATTEMPTS} concurrent pointer"):
        publish(publish_argv(run_uri, registry_uri))
    assert registry.read_pointer(registry_uri)["version"] == "f" * 16

    proxy.clear()
    assert publish(publish_argv(run_uri, registry_uri))["decision"] == "accepted"
    assert registry.read_pointer(registry_uri)["version"] == version


def test_a_corrupt_pointer_a_missing_version_and_a_checksum_mismatch_fail_at_once(s3):
    _, bucket = s3
    registry_uri = f"s3://{bucket}/registry"
    run_uri = f"s3://{bucket}/runs/r1"
    make_evaluated_run(run_uri, seed=1, test_accuracy=0.9)
    publish = fail_fast(tasks.publish_task)

    storage.write_bytes(registry.pointer_uri(registry_uri), b"{not json")
    with pytest.raises(AirflowFailException, match="registry pointer is not valid JSON"):
        publish(publish_argv(run_uri, registry_uri))

    storage.write_json(registry.pointer_uri(registry_uri), {"version": "0" * 16, "test_accuracy": 0.9})
    with pytest.raises(AirflowFailException, match=f"{'0' * 16}/model/model.json: no such file"):
        fail_fast(evaluate.champion_of)(registry_uri, registry.DEFAULT_MODEL_NAME)

    storage.write_bytes(storage.join(run_uri, "model", "model.npz"), b"replaced weights")
    with pytest.raises(AirflowFailException, match="checksum does not match"):
        publish(publish_argv(run_uri, registry_uri))


def test_an_http_source_that_fails_on_the_server_side_is_transient_not_missing(s3):
    proxy, bucket = s3
    source = f"{proxy.endpoint}/{bucket}/mnist"  # the test server serves the bucket over plain HTTP too
    storage.write_bytes(f"s3://{bucket}/mnist/t10k-labels-idx1-ubyte.gz", b"labels")
    proxy.fail(SLOW_DOWN, method="GET", key=".gz")
    with pytest.raises(storage.TransientStorageError, match="503"):
        idx.fetch_source_file(source, "t10k-labels-idx1-ubyte")

    proxy.clear()
    assert idx.fetch_source_file(source, "t10k-labels-idx1-ubyte") == (f"{source}/t10k-labels-idx1-ubyte.gz", b"labels")
