import os
from pathlib import Path

import pytest

from app.settings import Settings


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@db/registry")
    monkeypatch.setenv("REDIS_URL", "redis://queue:6379/2")
    monkeypatch.setenv("ARTIFACT_DIR", "/data/artifacts")
    monkeypatch.setenv("WORKER_DEVICE", "cuda:1")
    monkeypatch.setenv("WORKER_MEMORY_BUDGET_MB", "40000")
    settings = Settings()
    assert settings.resolved_database_url == "postgresql+psycopg://u@db/registry"
    assert settings.resolved_redis_url == "redis://queue:6379/2"
    assert settings.resolved_artifact_dir == Path("/data/artifacts")
    assert settings.worker_device == "cuda:1"
    assert settings.worker_memory_budget_mb == 40000


def test_embedded_defaults_live_under_the_var_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(var_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'registry.db'}"
    assert settings.resolved_redis_url == f"unix://{tmp_path / 'redis.sock'}"
    assert settings.resolved_artifact_dir == tmp_path / "artifacts"


def test_a_malformed_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MEMORY_BUDGET_MB", "a lot")
    with pytest.raises(ValueError, match="worker_memory_budget_mb"):
        Settings()


def test_the_artifact_store_setting_picks_the_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from app.storage import FolderStore, open_store
    from app.storage.bucket import BucketStore

    for name in ("ARTIFACT_DIR", "ARTIFACT_STORE", "ARTIFACT_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    local = open_store(Settings(var_dir=tmp_path))
    assert isinstance(local, FolderStore) and (local.root, local.durable) == (tmp_path / "artifacts", False)
    monkeypatch.setenv("ARTIFACT_STORE", "file:///mnt/shared/artifacts")
    shared = open_store(Settings(var_dir=tmp_path))
    assert isinstance(shared, FolderStore) and (shared.root, shared.durable) == (Path("/mnt/shared/artifacts"), True)
    monkeypatch.setenv("ARTIFACT_STORE", "s3://lab-artifacts/confprobe/prod/")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://minio:9000")
    bucket = open_store(Settings(var_dir=tmp_path))
    assert isinstance(bucket, BucketStore)
    assert (bucket.bucket, bucket.prefix, bucket.endpoint_url) == (
        "lab-artifacts",
        "confprobe/prod/",
        "http://minio:9000",
    )
    assert bucket.local_dir == tmp_path / "cache" / "artifacts"


@pytest.mark.parametrize(
    "url",
    [
        "/mnt/shared",
        "file://otherhost/mnt/shared",
        "file:relative/path",
        "s3://",
        "s3://Upper_Case/x",
        "s3://bucket/../escape",
        "gs://bucket/x",
        "s3://bucket/x?region=eu",
    ],
)
def test_an_artifact_store_that_cannot_be_opened_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(ValueError, match="artifact_store"):
        Settings(artifact_store=url)


def test_artifact_dir_and_artifact_store_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTIFACT_DIR", "/data/artifacts")
    monkeypatch.setenv("ARTIFACT_STORE", "s3://bucket/prefix")
    with pytest.raises(ValueError, match="ARTIFACT_STORE or ARTIFACT_DIR"):
        Settings()


def test_a_heartbeat_ttl_shorter_than_two_intervals_is_refused_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", "5")
    monkeypatch.setenv("HEARTBEAT_TTL_S", "8")
    with pytest.raises(ValueError, match=r"HEARTBEAT_TTL_S \(8\) must be at least twice HEARTBEAT_INTERVAL_S \(5\)"):
        Settings()
    monkeypatch.setenv("HEARTBEAT_TTL_S", "10")
    assert Settings().heartbeat_ttl_s == 10


def test_a_workers_memory_budget_defaults_to_half_the_machine_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.runtime import memory_budget_bytes

    monkeypatch.setenv("WORKER_MEMORY_BUDGET_MB", "")  # as docker compose passes an unset variable
    settings = Settings(worker_device="cpu")
    assert settings.worker_memory_budget_mb is None
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_budget_bytes(settings) == physical // 2
    assert memory_budget_bytes(Settings(worker_memory_budget_mb=3000)) == 3000 * 2**20
    with pytest.raises(ValueError, match="worker_memory_budget_mb"):
        Settings(worker_memory_budget_mb=0)
