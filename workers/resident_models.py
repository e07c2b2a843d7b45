"""Keeping loaded models resident between jobs.

A worker loads a registered model once and keeps it while it fits in the memory budget,
evicting the least recently used models before a new one is loaded, so the worker never
holds both. How much room to make comes from `workers/model_footprint.py`; loading itself
from `workers/model_loading.py`.
"""

import gc
from collections import OrderedDict
from pathlib import Path
from typing import Any

from app.registry.tables import Model
from workers.errors import JobFailed
from workers.model_footprint import estimate_adapter_footprint, estimate_footprint
from workers.model_loading import LoadedModel, attach_adapter, load_model

BUDGET_SETTING = "WORKER_MEMORY_BUDGET_MB"


def _mib(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:,.2f} MiB"


def _named(row: Model) -> str:
    return f"model {row.name!r} ({row.id}, {row.quantization or row.dtype})"


class ResidentModels:
    """An LRU cache of loaded models bounded by a memory budget. `loads` counts real loads.

    Room is made from estimates before a model loads or an adapter attaches, so the evicted
    and the new are never held together; then the real footprint replaces the estimate (and
    more is evicted if it is larger). What is estimated not to fit even alone — a base, or a
    base with its adapter — fails its job with `over_memory_budget` before anything is evicted
    or loaded; what turns out larger than the whole budget once loaded is dropped and fails
    the same way."""

    def __init__(self, budget_bytes: int, device: str) -> None:
        self.budget_bytes = budget_bytes
        self.device = device
        self.loads = 0
        self.adapter_loads = 0
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    # The heartbeat thread reads these while a job loads and evicts: each copies the entries
    # in one step instead of iterating the live dict.
    @property
    def used_bytes(self) -> int:
        return sum(loaded.footprint_bytes for loaded in list(self._models.values()))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"model_id": model_id, "bytes": loaded.footprint_bytes, "adapters": sorted(loaded.adapters)}
            for model_id, loaded in list(self._models.items())
        ]

    def get(self, row: Model, adapter: tuple[str, Path] | None = None) -> LoadedModel:
        """The resident model, loaded if it is not; with `adapter` (id, PEFT folder) attached
        to it — without reloading the base — if it is not yet."""
        loaded = self._models.get(row.id)
        attaching = adapter if adapter is not None and (loaded is None or adapter[0] not in loaded.adapters) else None
        adapter_bytes = estimate_adapter_footprint(attaching[1]) if attaching else 0
        if loaded is None:
            estimate = estimate_footprint(row, self.budget_bytes)
            with_adapter = (
                f" with adapter {attaching[0]} ({_mib(estimate)} + {_mib(adapter_bytes)})" if attaching else ""
            )
            self._refuse_beyond_budget(estimate + adapter_bytes, f"{_named(row)}{with_adapter} needs about")
            self._make_room(estimate + adapter_bytes)
            loaded = load_model(row, self.device)
            self.loads += 1
            self._models[row.id] = loaded
            self._settle(loaded, f"{_named(row)} takes, once loaded,")
        else:
            self._models.move_to_end(row.id)
        if attaching:
            self._attach(loaded, *attaching, adapter_bytes)
        return loaded

    def reserve(self, needed_bytes: int, what: str) -> None:
        """Room for `needed_bytes` outside the resident models (a training run's own copy of a
        model): least recently used models are evicted until it fits beside the rest; what
        cannot fit even alone fails with `over_memory_budget`, `what` saying what it is."""
        self._refuse_beyond_budget(needed_bytes, what)
        self._make_room(needed_bytes)

    def _refuse_beyond_budget(self, needed_bytes: int, what: str) -> None:
        if needed_bytes > self.budget_bytes:
            raise JobFailed(
                "over_memory_budget",
                f"{what} {_mib(needed_bytes)}, more than this worker's whole memory budget of {_mib(self.budget_bytes)}; "
                f"raise {BUDGET_SETTING}, or register the model in a smaller dtype or quantized",
                needed_bytes=needed_bytes,
                budget_bytes=self.budget_bytes,
                setting=BUDGET_SETTING,
            )

    def _make_room(self, needed_bytes: int, keep: str | None = None) -> None:
        """Evict the least recently used models, never `keep`, until `needed_bytes` more fit."""
        for model_id in list(self._models):
            if self.used_bytes + needed_bytes <= self.budget_bytes:
                return
            if model_id != keep:
                self.evict(model_id)

    def _settle(self, loaded: LoadedModel, what: str) -> None:
        """After `loaded` grew to its real size: evict others until it fits, or evict it too
        and fail when it cannot fit even alone (its estimate was short)."""
        self._make_room(0, keep=loaded.model_id)
        if loaded.footprint_bytes > self.budget_bytes:
            self.evict(loaded.model_id)
            self._refuse_beyond_budget(loaded.footprint_bytes, what)

    def _attach(self, loaded: LoadedModel, adapter_id: str, folder: Path, adapter_bytes: int) -> None:
        described = f"model {loaded.model_id} with adapter {adapter_id} ({_mib(loaded.footprint_bytes)} + {_mib(adapter_bytes)})"
        self._refuse_beyond_budget(loaded.footprint_bytes + adapter_bytes, f"{described} needs about")
        self._make_room(adapter_bytes, keep=loaded.model_id)
        attach_adapter(loaded, adapter_id, folder)
        self.adapter_loads += 1
        self._settle(loaded, f"model {loaded.model_id} with adapter {adapter_id} takes, once attached,")

    def evict(self, model_id: str) -> None:
        self._models.pop(model_id, None)
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
