"""The CUDA path is the CPU path: same scores on the same seeded model, NF4 with bf16 compute, QLoRA steps.

Runs only where CUDA is present (the H100 of the device tool; CI has none and skips it).
"""

from __future__ import annotations

import pytest
import torch

from slm_annotator.model.dataset import Example
from slm_annotator.model.loader import load_base, pick_device
from slm_annotator.model.prompt import PromptBuilder
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.model.scorer import Scorer
from slm_annotator.model.training import TrainConfig, train_adapter
from tests.conftest import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/><Choice value="mixed"/></Choices>
<Rating name="quality" toName="text" maxRating="5"/></View>"""
TEXTS = [f"review {i}: " + " ".join(["good", "bad", "fine", "odd"][j % 4] for j in range(i, i + 3 * i + 5))
         for i in range(24)]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("seeded") / "m", seed=3, hidden=256, layers=4)


def _dists(path, quant: str, device: str):
    base = load_base(str(path), path.parent, quant, device)
    rubric = parse_label_config(CONFIG)
    builder = PromptBuilder(base.tokenizer, rubric, 256)
    encoded = [builder.encode({"text": t}) for t in TEXTS]
    dists = Scorer(base.model, base.tokenizer, base.device, 8).distributions(
        encoded, [s.token_ids for s in builder.spaces])
    return base, rubric, torch.stack([torch.cat(d) for d in dists]).float()


def test_auto_picks_cuda() -> None:
    assert pick_device("auto").type == "cuda" and pick_device("cpu").type == "cpu"


def test_cuda_bf16_scores_match_the_cpu_path(seeded) -> None:
    _, _, cpu = _dists(seeded, "none", "cpu")
    _, _, gpu = _dists(seeded, "none", "cuda")
    assert (cpu - gpu).abs().max() < 0.02  # bf16 vs fp32 rounding only
    for lo, hi in ((0, 3), (3, 8)):  # same decision per dimension
        same = (cpu[:, lo:hi].argmax(1) == gpu[:, lo:hi].argmax(1)).float().mean()
        assert same >= 0.9


def test_nf4_on_cuda_scores_and_trains(seeded) -> None:
    base, rubric, dist = _dists(seeded, "nf4", "cuda")
    assert any(type(m).__name__ == "Linear4bit" for m in base.model.modules())
    assert torch.allclose(dist[:, :3].sum(1), torch.ones(len(TEXTS)), atol=1e-3)
    examples = [Example(str(i), {"text": t}, {"a": {"sentiment": "pos" if i % 2 else "neg", "quality": "3"}})
                for i, t in enumerate(TEXTS)]
    model, stats = train_adapter(base.model, base.tokenizer, rubric, examples,
                                 TrainConfig(epochs=2, lr=5e-3, max_tokens=256), base.device)
    assert stats.steps == 6 and all(torch.isfinite(torch.tensor(stats.losses)))
    assert stats.losses[-1] < stats.losses[0]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
