"""Migration 0014 moves the cache index from one row per text and layer to one row per shard
and one per text in a shard: every vector the old entries pointed at is found, and read, by
the new lookup."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import command

from app.registry.database import create_registry_engine, session_factory
from app.storage.folder import FolderStore
from tests.registry.test_adapter_identity_migration import alembic_config
from workers import arrays
from workers.state_cache import STATES_TENSOR, HiddenStateCache, Positions

HIDDEN = 4
SPACE_A, SPACE_B = "a" * 64, "b" * 64
OLD = sa.table(
    "hidden_state_cache",
    *(sa.column(name) for name in ("space", "text_sha256", "layer", "shard", "row", "slot", "truncated")),
)
# shard: (space, layers by slot, texts by row)
SHARDS = {
    "cache/aa/a/first.safetensors": (SPACE_A, [1, 2], ["t1", "t2", "t3"]),
    "cache/aa/a/second.safetensors": (SPACE_A, [3, 1], ["t3", "t4"]),
    "cache/aa/a/third.safetensors": (SPACE_A, [2, 5], ["t1"]),
    "cache/bb/b/first.safetensors": (SPACE_B, [2], ["t1", "t5"]),
}
TRUNCATED = {"t2"}


def written(store: FolderStore) -> dict[str, np.ndarray]:
    """Each shard's vectors, written as the cache writes a shard."""
    contents = {}
    for seed, (key, (_, layers, texts)) in enumerate(SHARDS.items()):
        states = np.random.default_rng(seed).standard_normal((len(texts), len(layers), HIDDEN)).astype(np.float32)
        with store.temporary_path(key) as path:
            arrays.write(path, STATES_TENSOR, states, metadata={})
        contents[key] = states
    return contents


def old_entries() -> list[dict[str, Any]]:
    """What the old index held: the first shard (in the order above) to index a (space, text,
    layer) kept it, so the third shard's layer 2 and the second's t3 at layer 1 are not in it."""
    entries: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key, (space, layers, texts) in SHARDS.items():
        for row, text in enumerate(texts):
            for slot, layer in enumerate(layers):
                entries.setdefault(
                    (space, text, layer),
                    {
                        "space": space,
                        "text_sha256": text,
                        "layer": layer,
                        "shard": key,
                        "row": row,
                        "slot": slot,
                        "truncated": text in TRUNCATED,
                    },
                )
    return list(entries.values())


def test_every_vector_the_old_index_pointed_at_is_read_through_the_new_one(database_url: str, tmp_path: Path) -> None:
    engine = create_registry_engine(database_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0013")
    store = FolderStore(tmp_path / "artifacts")
    contents = written(store)
    entries = old_entries()
    with engine.begin() as connection:
        connection.execute(sa.insert(OLD), entries)
        command.upgrade(alembic_config(connection), "head")

    with engine.begin() as connection:
        assert "hidden_state_cache" not in sa.inspect(connection).get_table_names()
        shards = {
            path: (space, layers, rows)
            for path, space, layers, rows in connection.execute(
                sa.text("SELECT path, space, layers, rows FROM cache_shards")
            )
        }
        text_rows = connection.execute(sa.text("SELECT count(*) FROM cached_texts")).scalar_one()

    assert {
        path: (space, layers if isinstance(layers, list) else json.loads(layers), rows)
        for path, (space, layers, rows) in shards.items()
    } == {
        "cache/aa/a/first.safetensors": (SPACE_A, [1, 2], 3),
        "cache/aa/a/second.safetensors": (SPACE_A, [3, 1], 2),
        "cache/aa/a/third.safetensors": (SPACE_A, [None, 5], 1),  # no entry named slot 0's layer
        "cache/bb/b/first.safetensors": (SPACE_B, [2], 2),
    }
    assert text_rows == 3 + 2 + 1 + 2  # one per text per shard, not one per layer

    sessions = session_factory(engine)
    for space in (SPACE_A, SPACE_B):
        cached = {(entry["text_sha256"], entry["layer"]): entry for entry in entries if entry["space"] == space}
        texts = sorted({text for text, _ in cached})
        layers = sorted({layer for _, layer in cached})
        cache = HiddenStateCache(sessions, store, space)
        # each layer alone, then several at once (t3 is in the first shard at 1 and 2, the second at 3)
        for asked in [[layer] for layer in layers] + [[3, 1, 2]]:
            hits = cache.lookup(texts, asked)
            whole = [all((text, layer) in cached for layer in asked) for text in texts]
            assert hits.found.tolist() == whole
            out = np.full((len(texts), len(asked), HIDDEN), np.nan, dtype=np.float32)
            cache.read_into(hits, out, Positions.of(np.arange(len(texts)), len(texts)))
            for index, text in enumerate(texts):
                if not whole[index]:
                    assert np.isnan(out[index]).all()
                    continue
                assert hits.truncated[index] == (text in TRUNCATED)
                for slot, layer in enumerate(asked):
                    entry = cached[(text, layer)]
                    vector = contents[entry["shard"]][entry["row"], entry["slot"]]
                    np.testing.assert_array_equal(out[index, slot], vector)
    assert HiddenStateCache(sessions, store, SPACE_A).lookup(["t3"], [3, 1, 2]).found.tolist() == [True]


def test_a_downgrade_gives_every_old_entry_back_pointing_at_the_same_vector(database_url: str, tmp_path: Path) -> None:
    engine = create_registry_engine(database_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0013")
    contents = written(FolderStore(tmp_path / "artifacts"))
    entries = old_entries()
    with engine.begin() as connection:
        connection.execute(sa.insert(OLD), entries)
        command.upgrade(alembic_config(connection), "head")
        command.downgrade(alembic_config(connection), "0013")
        back = {
            (space, text, layer): contents[shard][row, slot]
            for space, text, layer, shard, row, slot in connection.execute(
                sa.select(OLD.c.space, OLD.c.text_sha256, OLD.c.layer, OLD.c.shard, OLD.c.row, OLD.c.slot)
            )
        }
    assert set(back) == {(entry["space"], entry["text_sha256"], entry["layer"]) for entry in entries}
    for entry in entries:
        expected = contents[entry["shard"]][entry["row"], entry["slot"]]
        np.testing.assert_array_equal(back[(entry["space"], entry["text_sha256"], entry["layer"])], expected)
