"""A toy rubric a tiny random model learns in seconds: the sentiment word decides the label."""

from __future__ import annotations

import os
import random

from slm_annotator.settings import Settings
from slm_annotator.store import LabelIn, Store

CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/></Choices></View>"""
GOOD = ["great", "wonderful", "happy", "excellent", "lovely", "superb"]
BAD = ["awful", "terrible", "sad", "horrible", "nasty", "dreadful"]


def toy_label(t: int, annotation_id: int, rater: str, flip: bool = False) -> LabelIn:
    rng = random.Random(t)
    positive = t % 2 == 0
    word = rng.choice(GOOD if positive else BAD)
    value = "pos" if positive != flip else "neg"
    result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [value]}}]
    return LabelIn(annotation_id, t + 1, rater, result, {"sentiment": value}, {"text": " ".join([word] * 40)})


def fill(store: Store, project: str, n_tasks: int = 60, flip: bool = False, start_id: int = 1) -> None:
    """n_tasks tasks, two agreeing raters each."""
    store.upsert_project(project, label_config=CONFIG)
    for t in range(n_tasks):
        for r, rater in enumerate(["ann", "bob"]):
            store.upsert_label(project, toy_label(t, start_id + t * 2 + r, rater, flip))


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a worker subprocess needs to see the same store, Redis and model as the test."""
    return {**os.environ, "MODEL_DIR": str(settings.model_dir), "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url, "BASE_MODEL": settings.base_model, "QUANTIZATION": settings.quantization,
            "TRAIN_EPOCHS": str(settings.train_epochs), "TRAIN_LR": str(settings.train_lr),
            "HELDOUT_FRACTION": str(settings.heldout_fraction), "LORA_R": str(settings.lora_r),
            "TOKEN_DROPOUT_SHARE": str(settings.token_dropout_share), **extra}
