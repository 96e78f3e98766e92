"""The weekly click-log project of the retraining tests (the four-week test, the soak test): one week of
CSV clicks with a learnable signal, the params that read them, and the run summaries on the server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

WEEK = 7 * 24 * 3600
MOODS = ["dark", "funny", "romantic", "epic", "quiet", "scary"]
ROWS = 2000


def week_log(week: int, *, shuffle_labels: bool = False, drifted: bool = False, seed: int = 0) -> pd.DataFrame:
    """One week of clicks: users have a favourite mood, items a genre; some genres are clicked more, and
    a click is likelier when the genre is the user's mood."""
    rng = np.random.default_rng(seed * 100 + week)
    users = rng.integers(0, 300, ROWS)
    items = rng.integers(0, 120, ROWS)
    user_mood = np.array(MOODS)[np.arange(300) % 6]
    item_mood = np.array(MOODS)[(np.arange(120) * 5) % 6]
    genre_effect = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])[(np.arange(120) * 5) % 6]
    p = 1 / (1 + np.exp(2.0 - 2.5 * (user_mood[users] == item_mood[items]) - genre_effect[items]))
    label = (rng.random(ROWS) < p).astype(int)
    if shuffle_labels:
        label = rng.permutation(label)
    ts = 1_700_000_000 + (week - 1) * WEEK + np.sort(rng.integers(0, WEEK, ROWS))
    frame = pd.DataFrame({
        "user": [f"u{u}" for u in users], "item": [f"i{i}" for i in items],
        "gender": np.where(users % 2 == 0, "female", "male"), "age": np.array(["18-24", "25-34", "35-44"])[users % 3],
        "city": np.array(["paris", "oslo", "lima", "kyoto"])[users % 4], "mood": user_mood[users],
        "genre": item_mood[items], "clicked": label, "ts": ts})
    if drifted:  # a new market: every attribute of the users changed
        frame["gender"], frame["age"], frame["city"] = "unknown", "65+", "quito"
    return frame


def read_summaries() -> list[str]:
    """Every version of the ``retrain-summary`` markdown artefact on the Prefect server."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-summary"])))
            return [a.data for a in found]

    return anyio.run(read)


def weekly_params(bert: Path):
    from pipeline_repo import tiny_profile

    tiny = tiny_profile(bert)

    def update(p: dict) -> None:
        tiny(p)
        p["data"]["dataset"] = "csv"
        p["data"]["csv"].update({
            "files": ["incoming/*.csv"], "label": "clicked", "timestamp": "ts", "user": "user", "item": "item",
            "fields": [{"column": c, "name": n} for c, n in (("user", "User ID"), ("item", "Item ID"),
                                                              ("gender", "Gender"), ("age", "Age"), ("city", "City"),
                                                              ("mood", "Favourite mood"), ("genre", "Genre"))]})
        p["finetune"].update({"epochs": 5, "batch_size": 128, "lr": 1e-2, "lr_grid": [1e-2]})
        p["run"]["seeds"] = [2012, 2013]
        p["retrain"].update({"artifacts": ["flip_id"], "drift_policy": "stop", "min_auc": 0.6, "target_drift": 0.12,
                             "max_auc_drop": 0.05, "max_logloss_rise": 0.05})
    return update
