"""The toy rubric (slm_annotator.testing: the sentiment word decides the label) and the worker environment of a test."""

from __future__ import annotations

import os

from slm_annotator.model.rubric import parse_label_config
from slm_annotator.settings import Settings
from slm_annotator.testing import BAD, GOOD, TOY_CONFIG, fill, toy_label  # noqa: F401 (tests import them here)

CONFIG = TOY_CONFIG


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a worker subprocess needs to see the same store, Redis and model as the test."""
    return {**os.environ, "MODEL_DIR": str(settings.model_dir), "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url, "BASE_MODEL": settings.base_model, "QUANTIZATION": settings.quantization,
            "TRAIN_EPOCHS": str(settings.train_epochs), "TRAIN_LR": str(settings.train_lr),
            "HELDOUT_FRACTION": str(settings.heldout_fraction), "LORA_R": str(settings.lora_r),
            "TOKEN_DROPOUT_SHARE": str(settings.token_dropout_share), **extra}


# Two texts and four kinds of control (single and multiple choice, rating, number): the scorer tests' rubric.
QA_RUBRIC = parse_label_config(
    """<View>
      <Text name="question" value="$question"/>
      <Text name="answer" value="$answer"/>
      <Choices name="sentiment" toName="answer"><Choice value="Positive"/><Choice value="Negative"/></Choices>
      <Rating name="relevance" toName="answer" maxRating="5"/>
      <Choices name="topics" toName="answer" choice="multiple">
        <Choice value="sports"/><Choice value="politics"/></Choices>
      <Number name="stars" toName="answer" min="0" max="10"/>
    </View>"""
)
