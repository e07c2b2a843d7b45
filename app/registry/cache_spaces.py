"""Which model each space of the hidden-state cache belongs to (`CacheSpace`): recorded by
the cache before it first writes to a space, read when a model is deleted."""

from collections.abc import Collection

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from app.registry.database import transaction
from app.registry.tables import CachedText, CacheShard, CacheSpace

CHUNK = 500  # ids in one IN (…) list


def claim_space(sessions: sessionmaker[Session], space: str, model_id: str) -> None:
    """Record that `space` holds hidden states of `model_id` (once; again is no error). Made
    before the space's entries are committed, so no entry is ever without its model."""
    with transaction(sessions) as session:
        insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(CacheSpace).values(space=space, model_id=model_id).on_conflict_do_nothing())


def forget_models(session: Session, model_ids: Collection[str]) -> set[str]:
    """Delete the cache shards of the models' spaces (their `CacheShard` rows and the
    `CachedText` rows of their texts), except spaces another model claims too, and the
    models' claims; the paths of the deleted shards, for the caller to remove once nothing
    else refers to them."""
    ids = sorted(model_ids)
    claimed: set[str] = set()
    for start in range(0, len(ids), CHUNK):
        claimed.update(
            session.scalars(select(CacheSpace.space).where(CacheSpace.model_id.in_(ids[start : start + CHUNK])))
        )
    spaces = sorted(claimed)
    shared: set[str] = set()
    for start in range(0, len(spaces), CHUNK):
        shared.update(
            session.scalars(
                select(CacheSpace.space).where(
                    CacheSpace.space.in_(spaces[start : start + CHUNK]), CacheSpace.model_id.not_in(ids)
                )
            )
        )
    doomed = [space for space in spaces if space not in shared]
    shards: set[str] = set()
    for start in range(0, len(doomed), CHUNK):
        found = session.execute(
            select(CacheShard.id, CacheShard.path).where(CacheShard.space.in_(doomed[start : start + CHUNK]))
        ).all()
        shards.update(path for _, path in found)
        shard_ids = [shard_id for shard_id, _ in found]
        for first in range(0, len(shard_ids), CHUNK):
            chunk = shard_ids[first : first + CHUNK]
            session.execute(delete(CachedText).where(CachedText.shard_id.in_(chunk)))
            session.execute(delete(CacheShard).where(CacheShard.id.in_(chunk)))
    for start in range(0, len(ids), CHUNK):
        session.execute(delete(CacheSpace).where(CacheSpace.model_id.in_(ids[start : start + CHUNK])))
    return shards
