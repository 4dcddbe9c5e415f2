"""One training run of one project: labels -> split -> QLoRA -> alpha gate -> atomic promotion.

Idempotent by construction: the adapter is written to a temp dir and renamed into place only after the
gate; the served adapter changes in one database transaction. A run killed anywhere leaves what is served
untouched, and the next attempt starts over.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slm_annotator import project_settings
from slm_annotator.model.annotator import HEAD_DIR, served_from_folder
from slm_annotator.model.dataset import Example, examples_from_labels, split_heldout
from slm_annotator.model.evaluate import AS_IS, agreement, member_probs
from slm_annotator.model.heads import DEFAULT_ENCODER, Head, features, shared_encoder, train_head
from slm_annotator.model.loader import load_base
from slm_annotator.model.members import member_dir, member_of, member_paths
from slm_annotator.model.plan import DimPlan, Plan, choose
from slm_annotator.model.reliability import Reliability, estimate
from slm_annotator.model.rubric import RubricError, parse_label_config
from slm_annotator.model.training import TrainConfig, TrainStats, config_dict, save_adapter, train_adapter
from slm_annotator.schema import AdapterVersion
from slm_annotator.settings import Settings
from slm_annotator.store import ServedChanged, Store
from slm_annotator.worker.policy import members_for, prefill_bar_for, rater_weighting_for

log = logging.getLogger(__name__)
MIN_TASKS = 4
STALE_TMP_SECONDS = 600  # a temp adapter dir this old belongs to a run that died while saving
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RunOutcome:
    status: str  # promoted | refused | skipped | failed
    detail: str
    model_version: str | None = None
    metrics: dict[str, Any] | None = None


def train_config(settings: Settings, extra: dict[str, Any]) -> TrainConfig:
    """Global defaults from the environment; a project may override through extra_params['training']."""
    overrides = project_settings.stored(extra).training_overrides()  # bounded, validated at /setup
    base = TrainConfig(
        epochs=settings.train_epochs, lr=settings.train_lr, batch_size=settings.train_batch_size,
        micro_batch_size=settings.train_micro_batch, lora_layers=settings.lora_layers,
        class_balance=settings.train_class_balance, ordinal_loss=settings.train_ordinal_loss,
        label_mode=settings.train_label_mode, val_fraction=settings.train_val_fraction,
        patience=settings.train_patience,
        lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        targets=settings.lora_targets, token_dropout=settings.token_dropout,
        token_dropout_share=settings.token_dropout_share, seed=settings.seed, max_tokens=settings.max_prompt_tokens,
    )
    allowed = {k: v for k, v in overrides.items() if k in config_dict(base)}
    return TrainConfig(**{**config_dict(base), **allowed})


def project_dir(settings: Settings, project_id: str) -> Path:
    return settings.model_dir / "projects" / project_id / "adapters"


def load_examples(settings: Settings, store: Store, project_id: str) -> tuple[Any, list[Example], Reliability]:
    """The project's rubric and labelled tasks, each rater's vote weighted as the project asks (model.reliability).

    Weights are estimated on every label (held-out ones too: they use no model, only who agreed with whom) and
    change only the targets a learner fits; agreement is always measured against the raters' own labels.
    """
    project = store.project(project_id)
    if project is None or not project.label_config:
        raise RubricError(f"project {project_id} has no label config yet (connect it in Label Studio or sync)")
    rubric = parse_label_config(project.label_config, project.extra_params)
    examples = examples_from_labels(rubric, store.labels(project_id))
    reliability = estimate(rubric, examples, rater_weighting_for(settings, project.extra_params))
    return rubric, reliability.apply(examples), reliability


def run_training(
    settings: Settings, store: Store, project_id: str, run_id: int, progress: Progress | None = None,
    continual: bool = False,
) -> RunOutcome:
    started = time.perf_counter()
    project = store.project(project_id)
    extra = project.extra_params if project else {}
    rubric, examples, reliability = load_examples(settings, store, project_id)
    train, heldout = split_heldout(examples, settings.heldout_fraction, salt=f"project-{project_id}")
    served = store.served_adapter(project_id)
    pool = store.hard_pool(project_id) if continual else []
    if len(train) < MIN_TASKS or not heldout:
        store.mark_pool_used(project_id, [p.id for p in pool], run_id)
        return RunOutcome("skipped", f"{len(examples)} labelled tasks: need at least {MIN_TASKS + 1} to train and test")
    cfg = train_config(settings, extra)
    continual_info: dict[str, Any] = {}
    if continual and served is not None:  # without a served adapter, a full training takes the pool in
        train, continual_info = continual_set(rubric, pool, train, heldout, examples, settings.replay_ratio, cfg.seed)
    base = load_base(settings.base_model, settings.model_dir, settings.quantization, settings.device)
    k = members_for(settings, extra)
    init = Path(served.path) if continual_info and served is not None else None
    tmp = _tmp_dir(settings, store, project_id, run_id)
    try:
        model, stats = train_members(base, rubric, train, cfg, k, tmp, init, progress, {
            "project": project_id, "base_model": settings.base_model, "quantization": settings.quantization,
            "rubric_dimensions": [d.key for d in rubric.dimensions]})
        if progress:
            progress({"phase": "evaluating"})
        model, new_slots = _load_members(model, tmp, "new")
        probs = functools.partial(member_probs, model, base.tokenizer, base.device, rubric, heldout,
                                  settings.predict_batch_size, cfg.max_tokens)
        bar = prefill_bar_for(settings, extra)
        new_probs = probs(slots=new_slots)
        plan, head = choose_plan(settings, rubric, train, heldout, new_probs, bar)
        new_eval = agreement(rubric, heldout, plan_values(rubric, plan, plan_inputs(plan, head, rubric, heldout,
                                                                                    new_probs)))
        current_eval = _current_eval(settings, store, project_id, rubric, heldout, model, probs, k, served)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tolerance = settings.forgetting_tolerance if continual_info else settings.promotion_tolerance
    promote = new_eval["score"] >= current_eval["score"] - tolerance
    if continual_info:  # earlier held-out labels, before and after: forgetting blocks promotion
        before, after = current_eval["score"], new_eval["score"]
        continual_info["heldout_before"], continual_info["heldout_after"] = before, after
        continual_info["forgetting"] = None if before is None or after is None else round(before - after, 4)
    version = store.next_adapter_version(project_id)
    model_version = settings.adapter_version(project_id, version)
    metrics = {
        "new": new_eval, "current": current_eval,
        "current_version": served.model_version if served else settings.base_version,
        "train": {"tasks": len(train), "labels": stats[0].labels_seen // max(cfg.epochs, 1), "members": k,
                  "steps": sum(s.steps for s in stats), "seconds": round(sum(s.seconds for s in stats), 1),
                  "samples_per_second": round(stats[0].samples_per_second, 2),
                  "final_loss": stats[0].losses[-1] if stats[0].losses else None,
                  "val_losses": [round(v, 4) for v in stats[0].val_losses],
                  "best_epoch": [s.best_epoch for s in stats] if k > 1 else stats[0].best_epoch},
        "heldout_tasks": len(heldout), "config": config_dict(cfg), "continual": continual_info or None,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    metrics["plan"] = plan.summary()
    if reliability.method != "off":
        metrics["rater_weights"] = reliability.summary()
    if head is not None:
        head.save(tmp / HEAD_DIR)
        metrics["head"] = {"labels": store.count_labels(project_id), "tasks": len(train),
                           "encoder": settings.head_encoder}
    replace(plan, adapter_dir=f"v{version}", adapter_version=model_version).save(tmp)
    target = _promote_dir(settings, project_id, version, tmp, model_version)

    def regate(now_served: AdapterVersion) -> bool:  # a newer run's version: the gate it would have met
        for name in [n for n in getattr(model, "peft_config", {}) if n.startswith("current")]:
            model.delete_adapter(name)  # the old served version's members: their slot names are reused
        again = _current_eval(settings, store, project_id, rubric, heldout, model, probs, k, now_served)
        metrics.update(current=again, current_version=now_served.model_version)
        return bool(new_eval["score"] >= again["score"] - tolerance)

    promote, changed = record_adapter(store, AdapterVersion(
        project_id=project_id, version=version, model_version=model_version, path=str(target),
        status="served" if promote else "refused", base_model=settings.base_model, metrics=metrics,
        training_run_id=run_id,
    ), promote, served, regate)
    if promote:  # issue 15: re-predict the unlabelled tasks in Label Studio with the new version
        from slm_annotator.worker.bulk import refresh_after_promotion

        refresh_after_promotion(settings, store, project_id)
    store.mark_pool_used(project_id, [p.id for p in pool], run_id)
    current_eval = metrics["current"]
    detail = f"new {new_eval['score_kind']} {_fmt(new_eval['score'])} vs current {_fmt(current_eval['score'])}"
    return RunOutcome("promoted" if promote else "refused", f"{detail}; {changed}" if changed else detail,
                      model_version, metrics)


REGATES = 3  # runs promoted meanwhile that a finished run compares itself with again, before it gives up


def record_adapter(store: Store, adapter: AdapterVersion, promote: bool, served: AdapterVersion | None,
                 regate: Callable[[AdapterVersion], bool] | None = None) -> tuple[bool, str]:
    """Promotes only over the version the gate compared with (a compare-and-set in the store): a rollback made
    during the run sticks and the adapter is recorded as refused. A version that another run promoted meanwhile
    is compared with again (`regate`), as a run starting now would be. Returns (promoted, why not, if changed)."""
    expected = served.version if served is not None else None
    for _ in range(REGATES):
        try:
            store.add_adapter(adapter, serve=promote, expected_served=expected)
            return promote, ""
        except ServedChanged as exc:
            if regate is None or not exc.by_a_run or exc.current is None:
                adapter.status = "refused"
                adapter.metrics = {**(adapter.metrics or {}), "served_changed": str(exc)}
                store.add_adapter(adapter, serve=False)
                return False, f"not promoted: {exc}"
            expected, promote = exc.current.version, regate(exc.current)
            adapter.status = "served" if promote else "refused"
    adapter.status = "refused"
    store.add_adapter(adapter, serve=False)
    return False, "not promoted: the served version kept changing during the run"


def choose_plan(settings: Settings, rubric: Any, train: list[Example], heldout: list[Example],
                adapter_probs: list[Any], bar: float | None) -> tuple[Plan, Head | None]:
    """Per dimension the head (trained here on the same training split), the adapter or their blend, by
    held-out alpha; without heads (HEAD_EVERY=0) the adapter alone, with cut points fitted for it."""
    if settings.head_every <= 0:
        return choose(rubric, heldout, train, {"adapter": adapter_probs}, bar=bar), None
    encoder = shared_encoder(settings.head_encoder)
    x = features(encoder, rubric, [e.data for e in train + heldout])
    head = train_head(rubric, train, x[: len(train)], settings.head_encoder, settings.seed)
    head_probs = head.distributions(rubric, x[len(train):])
    fixed = {"head": [head.dims[d.key].decision for d in rubric.dimensions]}
    plan = choose(rubric, heldout, train, {"head": head_probs, "adapter": adapter_probs}, fixed, bar)
    return replace(plan, head=True), head


def plan_inputs(plan: Plan, head: Head | None, rubric: Any, examples: list[Example],
                adapter_probs: list[Any] | None, encoder: str = DEFAULT_ENCODER) -> dict[str, list[Any]]:
    """The distributions a plan reads for these examples: its head's and its adapter's."""
    out: dict[str, list[Any]] = {}
    if adapter_probs is not None:
        out["adapter"] = adapter_probs
    if head is not None and plan.needs("head"):
        x = features(shared_encoder(head.encoder or encoder), rubric, [e.data for e in examples])
        out["head"] = head.distributions(rubric, x)
    return out


def plan_values(rubric: Any, plan: Plan, inputs: dict[str, list[Any]]) -> list[list[str | None]]:
    """What a plan answers per example and dimension: exactly what serving decides (model.annotator)."""
    n = len(next(iter(inputs.values()))[0]) if inputs else 0
    rows: list[list[str | None]] = [[] for _ in range(n)]
    for d, dim in enumerate(rubric.dimensions):
        step = plan.dims.get(dim.key)
        parts = [inputs[s][d] for s in ("head", "adapter") if s in inputs and step is not None
                 and step.source in (s, "blend")]
        for i in range(n):
            if not parts or step is None:
                rows[i].append(None)
                continue
            probs = sum(p[i] for p in parts) / len(parts)
            rows[i].append(dim.values[int(step.decision.decide(probs)[0])])
    return rows


def _current_eval(settings: Settings, store: Store, project_id: str, rubric: Any, heldout: list[Example],
                  model: Any, probs: Any, k: int, served: Any) -> dict[str, Any]:
    """The served version on the same held-out tasks, decided the way it is served."""
    if served is None:
        with model.disable_adapter():
            return agreement(rubric, heldout, plan_values(rubric, _argmax_plan(rubric), {"adapter": probs(
                slots=[AS_IS])}))
    current = served_from_folder(served.model_version, Path(served.path), served.metrics)
    plan = current.plan
    assert plan is not None
    adapter_probs = None
    if current.adapter is not None and plan.needs("adapter"):
        model, cur_slots = _load_members(model, current.adapter.path, "current")
        adapter_probs = probs(slots=[cur_slots[member_of(len(cur_slots), t)] for t in range(k)])
    head = Head.load(current.head_dir) if current.head_dir is not None else None
    return agreement(rubric, heldout, plan_values(rubric, plan, plan_inputs(plan, head, rubric, heldout,
                                                                            adapter_probs)))


def _argmax_plan(rubric: Any) -> Plan:
    return Plan({d.key: DimPlan("adapter") for d in rubric.dimensions})


def continual_set(
    rubric: Any, pool: list[Any], train: list[Example], heldout: list[Example], everything: list[Example],
    replay_ratio: float, seed: int,
) -> tuple[list[Example], dict[str, Any]]:
    """The hard-sample pool (judge and human answers) plus a replay sample of earlier training labels.

    Pool items on held-out tasks are left out: the held-out labels must stay unseen to measure forgetting.
    """
    held = {e.task_key for e in heldout}
    data = {e.task_key: e.data for e in everything}
    by_task: dict[str, Example] = {}
    for sample in pool:
        key = str(sample.task_id)
        if key in held:
            continue
        values = {k: v for k, v in (sample.values or {}).items() if k in {d.key for d in rubric.dimensions}}
        task_data = sample.task_data or data.get(key) or {}
        if not values or not task_data:
            continue
        example = by_task.setdefault(key, Example(key, task_data))
        example.ratings[f"{sample.source}:{sample.annotator}"] = values
        example.hard = True
    hard = list(by_task.values())
    if not hard:  # nothing usable in the pool: an ordinary full training
        return train, {}
    rest = [e for e in train if e.task_key not in by_task]
    n_replay = min(len(rest), round(replay_ratio * len(hard)))
    replay = random.Random(seed).sample(rest, n_replay)
    return hard + replay, {"pool_items": len(hard), "replay_items": len(replay), "pool_samples": len(pool)}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def train_members(
    base: Any, rubric: Any, train: list[Example], cfg: TrainConfig, k: int, folder: Path, init: Path | None,
    progress: Progress | None, meta: dict[str, Any],
) -> tuple[Any, list[TrainStats]]:
    """Trains the k ensemble members one after another on one base (member t: seed + t, template t), saving each
    into the run's folder; returns the base with LoRA removed again, and each member's statistics."""
    model, stats = base.model, []
    inits = member_paths(init) if init is not None else ()
    for t in range(k):
        member_cfg = replace(cfg, seed=cfg.seed + t, template=t) if k > 1 else cfg
        start = inits[member_of(len(inits), t)] if inits else None
        report = (lambda u, t=t: progress({**u, "member": t + 1, "members": k})) if progress and k > 1 else progress
        peft_model, member_stats = train_adapter(
            model, base.tokenizer, rubric, train, member_cfg, base.device, init_adapter=start, progress=report)
        save_adapter(peft_model, member_dir(folder, t), {
            **meta, "member": t, "members": k, "template": member_cfg.template, "seed": member_cfg.seed})
        model = peft_model.unload()  # the bare base again, for the next member
        stats.append(member_stats)
    return model, stats


def _load_members(model: Any, folder: Path, prefix: str) -> tuple[Any, list[str]]:
    """Loads an adapter version's members as named peft adapters, the way serving loads them."""
    from peft import PeftModel

    slots = []
    for t, path in enumerate(member_paths(folder)):
        slots.append(f"{prefix}{t}")
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=slots[-1])
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=slots[-1])
    model.eval()
    return model, slots


def _tmp_dir(settings: Settings, store: Store, project_id: str, run_id: int) -> Path:
    """The run's members are written here while it trains; renamed into place only if it gets a version."""
    folder = project_dir(settings, project_id)
    folder.mkdir(parents=True, exist_ok=True)
    live = {r.id for r in store.runs(project_id) if r.status == "running" and r.id != run_id}
    _remove_dead_tmp(folder, live)
    tmp = folder / f".tmp-run{run_id}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _remove_dead_tmp(folder: Path, live_runs: set[int]) -> None:
    """Folders of runs that died mid-way (killed workers): never served, only disk. A run's folder goes as soon
    as the run is no longer running; one without a run id in its name once it is STALE_TMP_SECONDS old."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for stale in folder.glob(".tmp-*"):
        found = re.match(r"\.tmp-run(\d+)-", stale.name)
        try:
            if (int(found.group(1)) not in live_runs) if found else stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass


def _promote_dir(settings: Settings, project_id: str, version: int, tmp: Path, model_version: str) -> Path:
    """Rename: a reader sees no adapter dir or a complete one, never a half-written one."""
    for path in member_paths.__wrapped__(tmp):
        meta_file = path / "slm_adapter.json"
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({**meta, "version": version, "model_version": model_version},
                                        indent=2, sort_keys=True, default=str))
    target = project_dir(settings, project_id) / f"v{version}"
    if target.exists():  # an orphan of a run killed between rename and commit: it was never served
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
