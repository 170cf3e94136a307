"""Batch inference: score a Parquet/CSV file of entities through a route, exactly once, resumably."""

from inferline.batch.errors import BatchCancelled, BatchError, BatchInputError, BatchJobFailed
from inferline.batch.runner import run_batch, run_until_signal
from inferline.batch.spec import BatchJobSpec, Shard

__all__ = [
    "BatchCancelled",
    "BatchError",
    "BatchInputError",
    "BatchJobFailed",
    "BatchJobSpec",
    "Shard",
    "run_batch",
    "run_until_signal",
]
