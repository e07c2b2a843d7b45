"""The worker's C allocator keeps the memory a batch frees for the next batch. Each case runs
in a fresh interpreter: the thresholds are the process's for the rest of its life."""

import json
import subprocess
import sys

import pytest

from workers import allocator

pytestmark = pytest.mark.skipif(not allocator.glibc(), reason="the thresholds are glibc's")

# Batches of six activations alive at once, freed together, as a CPU forward pass allocates
# and frees them, of 8 to 20 MiB as batches of different lengths have; prints the minor page
# faults of three rounds of eight batches, after eight others. A busy machine moves a round's
# count now and then, either way (the kernel's doing, not the allocator's), so each case reads
# its clearest round: the fewest faults with the setting, the most without; the two bounds
# stay five times apart.
BATCHES = """
import json, resource, sys
import torch
from workers import allocator
changed = allocator.keep_freed_memory(int(sys.argv[1]))

def batch(index):
    tensors = [torch.ones((2 + index % 4) * 2**20 + 1024 * j) for j in range(6)]
    return float(sum(tensor[-1] for tensor in tensors))

for index in range(8):
    batch(index)
rounds = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for index in range(8):
        batch(index)
    rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"changed": changed, "rounds": rounds}))
"""
PAGES = 2 * 6 * (8 + 12 + 16 + 20) * 2**20 // 4096  # the pages eight batches touch


def batches(keep_bytes: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", BATCHES, str(keep_bytes)], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_batches_reuse_the_pages_the_batch_before_them_freed() -> None:
    kept = batches(2**30)
    assert kept["changed"] is True
    # all but a few were faulted in by the batches before (0 on a quiet machine)
    assert min(kept["rounds"]) < 0.05 * PAGES


def test_without_it_each_batch_faults_its_pages_in_afresh() -> None:
    # glibc's own thresholds give the memory back after most batches (90% of the pages fault
    # on a quiet machine): the comparison above measures the setting, not a process that
    # happens not to fault
    untouched = batches(0)
    assert untouched["changed"] is False
    assert max(untouched["rounds"]) > 0.25 * PAGES


def test_a_threshold_the_c_int_cannot_hold_is_refused_by_the_setting() -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match="worker_keep_freed_mb"):
        Settings(worker_keep_freed_mb=4096)
