"""Migration 0013 records, for the cache entries written before it, which model each space
belongs to: the spaces of every variant, token position, max_length and prompt format the
registry's rows say hidden states were computed for, as the cache itself computes them."""

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from app.inputs.model_sources import ModelShape, ResolvedSource
from app.registry.database import create_registry_engine
from app.registry.models import new_model
from app.registry.tables import (
    Adapter,
    Base,
    Comparison,
    Dataset,
    Extraction,
    Job,
    Model,
    Probe,
    ProbeEvaluation,
    ProbeRun,
    Transfer,
)
from tests.registry.test_adapter_identity_migration import alembic_config
from workers.state_cache import cache_space

SHAPE = ModelShape(architecture="LlamaForCausalLM", model_type="llama", num_layers=2, hidden_size=16)
SPLIT = {"train": 0.5, "validation": 0.25, "test": 0.25, "seed": 0}
IDENTITY = "i" * 64


def model_row(dtype: str) -> Model:
    return new_model(
        "m", ResolvedSource(kind="local", identity="/models/x", path=Path("/models/x")), None, dtype, None, SHAPE, "f"
    )


def old_rows(model: Model) -> list[list[Base]]:
    """One of each row that names a space, as revisions before 0013 wrote them, in the order
    their foreign keys need."""
    common = {"model_id": model.id, "token_position": "last"}
    dataset = Dataset(
        id="dst_a",
        name="d",
        kind="statements",
        source_format="jsonl",
        rows=1,
        label_balance={},
        sha256="d" * 64,
        upload_sha256="d" * 64,
        artifact="datasets/d.jsonl",
        size_bytes=1,
    )
    adapter = Adapter(
        id="adp_a",
        name="a",
        base_model_id=model.id,
        source_kind="upload",
        source="x",
        r=4,
        lora_alpha=8.0,
        target_modules=["q_proj"],
        sha256="s" * 64,
        identity=IDENTITY,
        size_bytes=1,
        artifact="adapters/a",
    )
    extraction = Extraction(
        id="ext_a",
        job_id="job_ext",
        model_id=model.id,
        adapter_id="adp_a",
        text_count=1,
        layers=[1],
        token_position="mean",
        max_length=32,
        prompt_format="chat",
        model_fingerprint="f",
        adapter_fingerprint=IDENTITY,
    )
    run = ProbeRun(
        id="prr_a",
        job_id="job_prr",
        adapter_id="adp_a",
        dataset_id="dst_a",
        layers=[1],
        methods=["logistic"],
        split=SPLIT,
        **common,
    )
    probe = Probe(
        id="prb_a",
        run_id="prr_a",
        dataset_id="dst_a",
        layer=1,
        method="logistic",
        max_length=16,
        artifact="probes/prb_a",
        validation={},
        metrics={},
        **common,
    )
    evaluation = ProbeEvaluation(
        id="evl_a",
        job_id="job_evl",
        probe_id="prb_a",
        model_id=model.id,
        dataset_id="dst_a",
        prompt_format="Q: {text}",
        rows="all",
    )
    comparison = Comparison(
        id="cmp_a",
        job_id="job_cmp",
        model_id=model.id,
        adapter_ids=["adp_a"],
        dataset_id="dst_a",
        layers=[1],
        method="logistic",
        token_position="last",
    )
    transfer = Transfer(
        id="trf_a",
        job_id="job_trf",
        train_dataset_ids=["dst_a"],
        test_dataset_ids=["dst_a"],
        layers=[1],
        method="logistic",
        max_length=8,
        prompt_format="raw",
        split=SPLIT,
        **common,
    )
    return [[dataset, adapter], [extraction, run], [probe], [evaluation, comparison, transfer]]


def test_spaces_written_before_are_recorded_for_their_model_as_the_cache_computes_them(database_url: str) -> None:
    engine = create_registry_engine(database_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0012")
    model, other = model_row("float32"), model_row("bfloat16")
    with engine.begin() as connection:
        session = Session(bind=connection)
        # the comparison's job, in the columns jobs had then (the table has gained some since)
        session.execute(
            sa.insert(Job).values(
                id="job_cmp", kind="comparison", params={"comparison_id": "cmp_a", "max_length": 64}, queue="q"
            )
        )
        batches: list[list[Base]] = [[model, other], *old_rows(model)]
        for rows in batches:
            session.add_all(rows)
            session.flush()
        command.upgrade(alembic_config(connection), "0013")
    with engine.begin() as connection:
        listed = connection.execute(sa.text("SELECT space, model_id FROM cache_spaces"))
        recorded = {(space, model_id) for space, model_id in listed}
    expected = {
        cache_space(model, IDENTITY, "mean", 32, "chat"),  # the extraction
        cache_space(model, IDENTITY, "last", None),  # the probe run
        cache_space(model, None, "last", 16, "Q: {text}"),  # the evaluation: its probe's position and length
        cache_space(model, None, "last", 64),  # the comparison's base…
        cache_space(model, IDENTITY, "last", 64),  # …and its adapter
        cache_space(model, None, "last", 8),  # the transfer
    }
    assert recorded == {(space, model.id) for space in expected}
