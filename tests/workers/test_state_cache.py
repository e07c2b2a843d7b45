"""Hidden states for the content cache: truncation, out-of-memory splitting, cache spaces."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import tiny_models
from workers import hidden_states, state_cache
from workers.model_loading import LoadedModel


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models.save_tiny_llama(tmp_path_factory.mktemp("llama"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return LoadedModel("mdl_test", model, AutoTokenizer.from_pretrained(folder), 0, 0, True)


def test_texts_over_max_length_are_truncated_and_counted(loaded: LoadedModel) -> None:
    texts = ["short", "a much longer text that the tokenizer splits into many tokens"]
    full = [len(ids) for ids in loaded.tokenizer(texts)["input_ids"]]
    tokenized = state_cache.tokenize(loaded.tokenizer, texts, max_length=full[0] + 1)
    assert tokenized.truncated == [False, True]
    assert [len(ids) for ids in tokenized.token_ids] == [full[0], full[0] + 1]
    assert tokenized.token_ids[1][0] == loaded.tokenizer.bos_token_id


def test_an_out_of_memory_batch_is_split_and_retried(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # one length, so that all twelve form one batch first
    texts = ["The city of Paris is in France."] * 12
    token_ids = state_cache.tokenize(loaded.tokenizer, texts, None).token_ids
    options: dict[str, Any] = {"device": "cpu", "token_budget": 10_000, "max_batch_size": 64}
    expected = state_cache.compute(loaded, token_ids, [1, 2], "last", **options)

    real_read_texts = hidden_states.read_texts
    batch_sizes: list[int] = []

    def no_room_for_more_than_three(model: Any, texts: Any, layers: Any, token_position: str, **options: Any) -> Any:
        batch_sizes.append(len(texts))
        if len(texts) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: this machine has no GPU)")
        return real_read_texts(model, texts, layers, token_position, **options)

    monkeypatch.setattr(state_cache, "read_texts", no_room_for_more_than_three)
    got = state_cache.compute(loaded, token_ids, [1, 2], "last", **options)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert batch_sizes[0] == 12 and max(batch_sizes[1:]) <= 6


def test_a_single_text_that_does_not_fit_fails_the_job_clearly(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.errors import JobFailed

    def never_fits(*_: Any, **__: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(state_cache, "read_texts", never_fits)
    with pytest.raises(JobFailed, match="lower max_length") as failure:
        state_cache.compute(loaded, [[1, 5, 6]], [1], "last", device="cpu", token_budget=100, max_batch_size=4)
    assert failure.value.code == "out_of_memory"


def test_the_cache_space_changes_with_everything_the_vectors_depend_on(tmp_path: Path) -> None:
    from app.registry.tables import Model

    base = {"source": "/m", "revision": None, "fingerprint": "f", "quantization": None, "dtype": "float32"}
    spaces = {
        state_cache.cache_space(Model(**base), None, "last", None),
        state_cache.cache_space(Model(**base | {"dtype": "bfloat16"}), None, "last", None),
        state_cache.cache_space(Model(**base | {"quantization": "8bit"}), None, "last", None),
        state_cache.cache_space(Model(**base | {"fingerprint": "g"}), None, "last", None),
        state_cache.cache_space(Model(**base), "adapter-sha", "last", None),
        state_cache.cache_space(Model(**base), None, "mean", None),
        state_cache.cache_space(Model(**base), None, "last", 32),
    }
    assert len(spaces) == 7


# --- the index: shards and the texts in them ------------------------------------------------------

HIDDEN = 8


@pytest.fixture
def cache(database_url: str, tmp_path: Path) -> Iterator[state_cache.HiddenStateCache]:
    from app.registry.database import create_registry_engine, session_factory
    from app.storage.folder import FolderStore

    engine = create_registry_engine(database_url)
    yield state_cache.HiddenStateCache(session_factory(engine), FolderStore(tmp_path / "artifacts"), "s" * 64)
    engine.dispose()  # its pooled connections closed: the tests' PostgreSQL has a connection limit


def vectors(seed: int, texts: int, layers: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((texts, layers, HIDDEN)).astype(np.float32)


def read(
    cache: state_cache.HiddenStateCache, texts: list[str], layers: list[int]
) -> tuple[state_cache.Hits, np.ndarray]:
    """What `cached_states` does with a lookup: every output row of every distinct text."""
    distinct = list(dict.fromkeys(texts))
    inverse = np.array([distinct.index(text) for text in texts], dtype=np.int64)
    hits = cache.lookup(distinct, layers)
    out = np.full((len(texts), len(layers), HIDDEN), np.nan, dtype=np.float32)
    cache.read_into(hits, out, state_cache.Positions.of(inverse, len(distinct)))
    return hits, out


def test_each_layer_of_a_text_is_read_from_a_shard_that_holds_it(cache: state_cache.HiddenStateCache) -> None:
    first, second = vectors(0, 3, 2), vectors(1, 2, 2)
    cache.add("first", ["a", "b", "c"], [1, 2], first, [False, True, False])
    cache.add("second", ["c", "d"], [3, 2], second, [False, False])  # "c" again, in another slot order

    texts = ["c", "a", "d", "c", "b"]  # "c" twice: both output rows get its vectors
    hits, out = read(cache, texts, [3, 1, 2])
    distinct = list(dict.fromkeys(texts))  # c, a, d, b
    assert hits.found.tolist() == [True, False, False, False]  # only "c" is in a shard at layer 3 and at layer 1
    np.testing.assert_array_equal(out[0], np.stack([second[0, 0], first[2, 0], first[2, 1]]))
    np.testing.assert_array_equal(out[3], out[0])
    assert np.isnan(out[[1, 2, 4]]).all()  # texts not found whole are left to be computed

    hits, out = read(cache, texts, [2])
    assert hits.found.tolist() == [True] * 4
    assert hits.truncated.tolist() == [text == "b" for text in distinct]
    expected = {"a": first[0, 1], "b": first[1, 1], "c": first[2, 1], "d": second[1, 1]}
    np.testing.assert_array_equal(out[:, 0], np.stack([expected[text] for text in texts]))


def test_a_shard_is_one_registry_row_and_each_text_one_more_whatever_its_layers(
    cache: state_cache.HiddenStateCache,
) -> None:
    from sqlalchemy import func, select

    from app.registry.tables import CachedText, CacheShard

    cache.add("wide", [f"text {i}" for i in range(5)], [0, 1, 2, 3, 4, 5, 6, 7], vectors(2, 5, 8), [False] * 5)
    with cache.sessions() as session:
        shard = session.scalars(select(CacheShard)).one()
        assert (shard.space, shard.path, shard.layers, shard.rows) == (
            cache.space,
            cache.shard_key("wide"),
            [0, 1, 2, 3, 4, 5, 6, 7],
            5,
        )
        assert session.scalar(select(func.count()).select_from(CachedText)) == 5
        assert sorted(session.scalars(select(CachedText.row))) == [0, 1, 2, 3, 4]


def test_lookups_of_more_texts_than_one_query_takes_find_every_one(
    cache: state_cache.HiddenStateCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_cache, "LOOKUP_CHUNK", 7)
    monkeypatch.setattr(state_cache, "READ_BLOCK_BYTES", 3 * 2 * HIDDEN * 4)  # three rows a copy
    texts = [f"text {i}" for i in range(30)]
    states = vectors(3, 30, 2)
    cache.add("many", texts, [4, 5], states, [i % 3 == 0 for i in range(30)])
    asked = [*texts[::-1], "never cached"]
    hits, out = read(cache, asked, [5, 4])
    assert hits.found.tolist() == [True] * 30 + [False]
    assert hits.truncated[:30].tolist() == [i % 3 == 0 for i in range(29, -1, -1)]
    np.testing.assert_array_equal(out[:30], states[::-1, ::-1])


@pytest.mark.filterwarnings("ignore:Column 'cached_texts.text_sha256' is marked as a member of the primary key")
def test_a_shard_whose_index_fails_to_commit_is_taken_away(cache: state_cache.HiddenStateCache) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):  # a text without a hash: the registry refuses the row
        cache.add("broken", ["a", None], [1], vectors(4, 2, 1), [False, False])  # type: ignore[list-item]
    assert not cache.store.exists(cache.shard_key("broken"))
    assert not cache.lookup(["a"], [1]).found.any()


def test_a_shard_written_again_under_its_name_replaces_its_index(cache: state_cache.HiddenStateCache) -> None:
    cache.add("again", ["a", "b"], [1], vectors(5, 2, 1), [False, False])
    states = vectors(6, 2, 1)
    cache.add("again", ["b", "c"], [1], states, [False, False])
    hits, out = read(cache, ["a", "b", "c"], [1])
    assert hits.found.tolist() == [False, True, True]
    np.testing.assert_array_equal(out[1:], states)


def test_runs_of_consecutive_rows_land_at_their_texts_output_rows(cache: state_cache.HiddenStateCache) -> None:
    texts = [f"text {i}" for i in range(40)]
    states = vectors(7, 40, 2)
    cache.add("runs", texts, [1, 2], states, [False] * 40)
    # two runs of the shard's rows, split by a text it does not hold, the last text asked twice
    asked = [*texts[:25], "elsewhere", *texts[25:], texts[-1]]
    hits, out = read(cache, asked, [1, 2])
    assert hits.found.tolist() == [True] * 25 + [False] + [True] * 15
    np.testing.assert_array_equal(out[:25], states[:25])
    np.testing.assert_array_equal(out[26:41], states[25:])
    np.testing.assert_array_equal(out[41], states[39])
    assert np.isnan(out[25]).all()


def test_a_text_cached_in_another_space_is_not_found_in_this_one(cache: state_cache.HiddenStateCache) -> None:
    other = state_cache.HiddenStateCache(cache.sessions, cache.store, "o" * 64)
    theirs, ours = vectors(2, 2, 1), vectors(3, 1, 1)
    other.add("theirs", ["a", "b"], [1], theirs, [True, True])
    cache.add("ours", ["b"], [1], ours, [False])

    hits, out = read(cache, ["a", "b"], [1])
    assert hits.found.tolist() == [False, True]
    assert hits.truncated.tolist() == [False, False]  # not the other space's flags
    np.testing.assert_array_equal(out[1], ours[0])
    assert np.isnan(out[0]).all()
    hits, out = read(other, ["b", "a"], [1])
    assert hits.found.tolist() == [True, True]
    np.testing.assert_array_equal(out, theirs[[1, 0]])
