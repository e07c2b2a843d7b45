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
