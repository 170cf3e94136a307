"""Deterministic driver-stats data: the one source for the Feast demo repo and model training.

Both the Parquet file behind the Feast feature view and the training set of the demo
models are drawn from the same distributions here, so the models see at serving time
the kind of values they were trained on.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

FIRST_DRIVER_ID = 1001
NUM_DRIVERS = 100_000
"""Drivers in the demo store (ids 1001..101000): a pool large enough that benchmarks drawing
ids Zipf-distributed over it exercise both the features service's hot cache and Feast."""
HISTORY_DRIVERS = 1000
"""The first drivers (ids 1001..2000) have a full hourly history; the rest one row each (see
``hourly_driver_stats``)."""
PRIMARY_FEATURES = ("conv_rate", "acc_rate", "avg_daily_trips", "trip_distance_km")
LIGHT_FEATURES = ("conv_rate", "acc_rate")


def driver_ids() -> np.ndarray:
    """All driver ids present in the demo feature store."""
    return np.arange(FIRST_DRIVER_ID, FIRST_DRIVER_ID + NUM_DRIVERS, dtype=np.int64)


def sample_features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draw ``n`` rows of the four primary features from the demo distributions."""
    return {
        "conv_rate": rng.beta(2.0, 2.0, n).astype(np.float32),
        "acc_rate": rng.beta(5.0, 2.0, n).astype(np.float32),
        "avg_daily_trips": rng.gamma(4.0, 120.0, n).astype(np.float32),
        "trip_distance_km": rng.gamma(2.0, 3.0, n).astype(np.float32),
    }


def acceptance_logit(f: dict[str, np.ndarray]) -> np.ndarray:
    """The ground-truth rule the demo labels follow (what the models learn)."""
    return (
        4.0 * (f["conv_rate"] - 0.5)
        + 3.0 * (f["acc_rate"] - 0.7)
        + 0.003 * (f["avg_daily_trips"] - 480.0)
        - 0.15 * (f["trip_distance_km"] - 6.0)
    )


def training_set(seed: int = 7, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, 4]`` (PRIMARY_FEATURES order) and 0/1 labels, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    f = sample_features(rng, n)
    p = 1.0 / (1.0 + np.exp(-acceptance_logit(f)))
    y = (rng.random(n) < p).astype(np.float32)
    x = np.stack([f[name] for name in PRIMARY_FEATURES], axis=1).astype(np.float32)
    return x, y


def hourly_driver_stats(now: dt.datetime, hours: int = 24, seed: int = 11) -> pd.DataFrame:
    """Stats of every demo driver before ``now`` (UTC): hourly for ``HISTORY_DRIVERS``, latest hour for the rest.

    The first ``HISTORY_DRIVERS`` drivers get one row per hour for the last ``hours`` hours
    (what point-in-time batch reads join against); every other driver gets a single row at
    the latest hour. The online store keeps only each driver's latest row, so the long tail
    loses nothing online, and ``make setup`` stays cheap: 24 rows for each of 100,000 drivers
    (2.4 M rows) would make the Parquet file ~20x larger and Feast's materialisation read and
    de-duplicate all of them, for the same online store.

    Values are deterministic for a seed (the history drivers' values do not depend on
    ``NUM_DRIVERS``); only the timestamps follow ``now`` so that a fresh ``feast
    materialize-incremental`` always finds them inside its window.
    """
    rng = np.random.default_rng(seed)
    ids = driver_ids()
    history, tail = ids[:HISTORY_DRIVERS], ids[HISTORY_DRIVERS:]
    end = now.replace(minute=0, second=0, microsecond=0)
    frames = [
        _stats_frame(history, end - dt.timedelta(hours=hours - 1 - h), sample_features(rng, len(history)))
        for h in range(hours)
    ]
    if len(tail):
        frames.append(_stats_frame(tail, end, sample_features(rng, len(tail))))
    return pd.concat(frames, ignore_index=True)


def _stats_frame(ids: np.ndarray, ts: dt.datetime, f: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "driver_id": ids,
            "event_timestamp": pd.Timestamp(ts),
            "created": pd.Timestamp(ts),
            "conv_rate": f["conv_rate"],
            "acc_rate": f["acc_rate"],
            "avg_daily_trips": f["avg_daily_trips"].round().astype(np.int64),
        }
    )
