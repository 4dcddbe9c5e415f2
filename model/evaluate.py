"""Model-human agreement on held-out tasks: the gate an adapter must pass to be served."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from slm_annotator.model.dataset import Example
from slm_annotator.model.ensemble import vote
from slm_annotator.model.heldout import agreement, scale_value  # noqa: F401  (the gate's measure, re-exported)
from slm_annotator.model.prompt import PromptBuilder
from slm_annotator.model.rubric import Rubric
from slm_annotator.model.scorer import Scorer

AS_IS = "<as-is>"  # score with whatever adapter the model has active


def predict_examples(
    model: Any, tokenizer: Any, device: torch.device, rubric: Rubric, examples: Sequence[Example],
    batch_size: int = 8, max_tokens: int = 1024, decoding: str = "argmax", slots: Sequence[str | None] = (AS_IS,),
) -> list[list[str]]:
    """Member t reads prompt template t with peft adapter slots[t] (None: adapters off); the members vote.

    The gate scores exactly what would be served: the same members, templates and vote as ModelServer.predict.
    """
    candidates = None
    member_dists = []
    for t, slot in enumerate(slots):
        builder = PromptBuilder(tokenizer, rubric, max_tokens, t)
        candidates = candidates or [s.token_ids for s in builder.spaces]
        encoded = [builder.encode(e.data) for e in examples]
        with _active(model, slot):
            member_dists.append(Scorer(model, tokenizer, device, batch_size).distributions(encoded, candidates))
    modes = ["expected" if decoding == "expected" and d.level != "nominal" else "argmax" for d in rubric.dimensions]
    return [
        [vote(d.values, [m[i][j] for m in member_dists], modes[j]).score.value for j, d in enumerate(rubric.dimensions)]
        for i in range(len(examples))
    ]


@contextlib.contextmanager
def _active(model: Any, slot: str | None) -> Iterator[None]:
    if slot == AS_IS:
        yield
    elif slot is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(slot)
        yield


def member_probs(
    model: Any, tokenizer: Any, device: torch.device, rubric: Rubric, examples: Sequence[Example],
    batch_size: int = 8, max_tokens: int = 1024, slots: Sequence[str | None] = (AS_IS,),
) -> list[Any]:
    """Per dimension an (n, n_values) numpy array: the members' mean distribution, as a plan blends it."""
    import numpy as np

    runs = []
    for t, slot in enumerate(slots):
        builder = PromptBuilder(tokenizer, rubric, max_tokens, t)
        encoded = [builder.encode(e.data) for e in examples]
        with _active(model, slot):
            runs.append(Scorer(model, tokenizer, device, batch_size).distributions(
                encoded, [s.token_ids for s in builder.spaces]))
    return [np.stack([np.mean([run[i][d].double().numpy() for run in runs], axis=0) for i in range(len(examples))])
            if examples else np.zeros((0, len(dim.values))) for d, dim in enumerate(rubric.dimensions)]
