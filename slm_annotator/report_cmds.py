"""`slm-annotator evaluate` and `slm-annotator learning-curve`: read labels, compute, write HTML + JSON."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slm_annotator.redact import setup_logging
from slm_annotator.settings import Settings, load_settings

log = logging.getLogger(__name__)


def write_report(out: Path, name: str, data: dict[str, Any], html: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / f"{name}.json", out / f"{name}.html"
    json_path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str))
    html_path.write_text(html, encoding="utf-8")
    return json_path, html_path


def _names(raw: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (raw or "").split(",") if x.strip())


def _row_options(args: argparse.Namespace) -> Any:
    from slm_annotator.model.annotations_io import RowOptions

    return RowOptions(_names(args.dimensions), args.dimension, _names(args.model_rater))


def _file_ratings(args: argparse.Namespace) -> Any:
    from slm_annotator.model.annotations_io import read_ratings

    config = Path(args.label_config).read_text(encoding="utf-8") if args.label_config else None
    return read_ratings(Path(args.data), config, _row_options(args))


def predict_now(settings: Settings, store: Any, project_id: str, ratings: Any) -> str:
    """Predictions of the project's served adapter (or the base model) for its labelled tasks, stored like
    /predict stores them, so the live report shows them too. Loads the model."""
    from slm_annotator.model.annotations_io import result_values
    from slm_annotator.model.dataset import flat_keys
    from slm_annotator.model.rubric import parse_label_config
    from slm_annotator.model.serving import AdapterRef, ModelServer

    project = store.project(project_id)
    rubric = parse_label_config(project.label_config, project.extra_params)
    served = store.served_adapter(project_id)
    ref = AdapterRef(served.model_version, Path(served.path)) if served else None
    version = served.model_version if served else settings.base_version
    items = [i for i in ratings.items if set(rubric.data_keys) <= flat_keys(ratings.data.get(i) or {})]
    server = ModelServer(settings.base_model, settings.model_dir, settings.quantization, settings.device,
                         settings.predict_batch_size, settings.max_prompt_tokens, 1)
    preds = server.predict(rubric, [{"data": ratings.data[i]} for i in items], ref, version,
                           str((project.extra_params or {}).get("decoding", "argmax")))
    rows = []
    for item, pred in zip(items, preds, strict=True):
        ratings.models.setdefault(version, {})[item] = result_values(rubric, pred.result)
        if item.lstrip("-").isdigit():
            rows.append({"task_id": int(item), "model_version": version, "values": ratings.models[version][item],
                         "score": pred.score})
    ratings.model_times[version] = datetime.now(UTC).isoformat(timespec="seconds")
    store.record_predictions(project_id, rows)
    return version


def _project_ratings(args: argparse.Namespace, settings: Settings) -> tuple[Any, str | None]:
    from slm_annotator.model.annotations_io import from_store
    from slm_annotator.project_report import pick_model
    from slm_annotator.store import Store

    store = Store(settings.database_url)
    try:
        ratings = from_store(store, args.project)
    except KeyError:
        raise ValueError(f"unknown project {args.project!r}") from None
    served = store.served_adapter(args.project)
    version = served.model_version if served else settings.base_version
    if args.no_model or args.model_version:
        return ratings, None
    if args.predict or version not in ratings.models:
        version = predict_now(settings, store, args.project, ratings)
    return ratings, pick_model(ratings, version)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Agreement of humans with each other and of the model with the humans, per dimension."""
    from slm_annotator.model.agreement_report import annotator_table, build_report, text_table
    from slm_annotator.model.annotations_io import InputError, apply_levels, parse_levels
    from slm_annotator.model.report_html import render_evaluate

    settings = load_settings()
    setup_logging(settings)
    try:
        if args.project:
            ratings, model = _project_ratings(args, settings)
        else:
            ratings = _file_ratings(args)
            model = None if args.no_model else ratings.latest_model()
        ratings = apply_levels(ratings, parse_levels(args.level or []))
        model = args.model_version or model
        report = build_report(ratings, model, args.n_boot, args.seed, args.title or "")
    except (InputError, ValueError, OSError) as exc:  # RubricError is a ValueError
        print(f"evaluate: {exc}", flush=True)
        return 2
    json_path, html_path = write_report(args.out, "report", report, render_evaluate(report))
    print(text_table(report))
    print("\nPer annotator (mean over dimensions):\n" + annotator_table(report))
    print(f"\n{html_path}\n{json_path}")
    return 0


def cmd_learning_curve(args: argparse.Namespace) -> int:
    """Trains on growing nested subsets, evaluates each on one fixed held-out set."""
    from slm_annotator.model.annotations_io import InputError, read_ratings, to_devset
    from slm_annotator.model.experiment import load_devset, recipe_from
    from slm_annotator.model.learning_curve import CurveRunner, run_learning_curve
    from slm_annotator.model.report_html import render_learning_curve

    settings = load_settings()
    setup_logging(settings)
    try:
        if args.data:
            config = Path(args.label_config).read_text(encoding="utf-8") if args.label_config else None
            ds = to_devset(read_ratings(Path(args.data), config, _row_options(args)), Path(args.data).name)
        else:
            ds = load_devset(args.dataset)
        cfg = recipe_from({"max_tokens": settings.max_prompt_tokens, **json.loads(args.recipe)})
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
        seeds = [int(s) for s in args.seeds.split(",")]
    except (InputError, ValueError, OSError) as exc:
        print(f"learning-curve: {exc}", flush=True)
        return 2
    runner = CurveRunner(settings.base_model, settings.model_dir, settings.quantization, settings.device)

    def save(result: dict[str, Any]) -> None:  # after every point: a long GPU run keeps what it measured
        write_report(args.out, "learning_curve", result, render_learning_curve(result))

    result = run_learning_curve(ds, cfg, runner, sizes, seeds, args.test_fraction, args.split_seed, args.n_boot,
                                on_point=save)
    save(result)
    for p in result["points"]:
        print(f"{p['n_train']:>6} items: adapter {_f(p['adapter_mean'])}, majority {_f(p['majority_mean'])}")
    print(f"base {_f(result['base_mean'])}, humans pairwise {_f(result['human_pairwise_mean'])}")
    print(f"\n{args.out / 'learning_curve.html'}\n{args.out / 'learning_curve.json'}")
    return 0


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def add_parsers(sub: Any) -> None:
    ev = sub.add_parser("evaluate", help="agreement report (humans vs humans, model vs humans): HTML + JSON")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="Label Studio JSON export, or CSV/JSONL: one row per (item, rater) or one "
                                    "column per rater")
    src.add_argument("--project", help="a live project's stored labels and predictions")
    _row_args(ev)
    ev.add_argument("--level", action="append", metavar="DIM=LEVEL",
                    help="override a dimension's level (nominal|ordinal|interval); a bare level applies to all")
    ev.add_argument("--model-version", help="which model (LS prediction model_version, --model-rater, stored "
                                            "version) to judge; default: the served or latest one")
    ev.add_argument("--no-model", action="store_true", help="humans only")
    ev.add_argument("--predict", action="store_true", help="--project: predict now with the served adapter even "
                                                           "if stored predictions exist")
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--title")
    ev.add_argument("--out", type=Path, default=Path("report"))
    ev.set_defaults(func=cmd_evaluate)
    lc = sub.add_parser("learning-curve", help="alpha per dimension against the number of labelled items")
    lc.add_argument("--dataset", default="usr", help="usr | goemotions | lewidi:<name> (from $SLM_SHARED_DATA)")
    lc.add_argument("--data", help="your own labels instead (as for evaluate; needs --label-config)")
    _row_args(lc)
    lc.add_argument("--sizes", help="comma-separated training sizes (default 25,50,100,200,... and the whole "
                                    "training split)")
    lc.add_argument("--seeds", default="0", help="comma-separated seeds: subset order and training seed")
    lc.add_argument("--recipe", default="{}", help='training overrides as JSON, e.g. {"epochs": 8}')
    lc.add_argument("--test-fraction", type=float, default=1 / 3)
    lc.add_argument("--split-seed", type=int, default=0)
    lc.add_argument("--n-boot", type=int, default=200)
    lc.add_argument("--out", type=Path, default=Path("learning-curve"))
    lc.set_defaults(func=cmd_learning_curve)


def _row_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-config", help="label config XML file (the rubric); inferred when absent")
    parser.add_argument("--dimensions", help="CSV/JSONL: comma-separated dimension columns (default: all "
                                             "but item, rater and text columns)")
    parser.add_argument("--dimension", default="label", help="wide CSV with plain rater columns: the dimension name")
    parser.add_argument("--model-rater", help="CSV/JSONL: rater name(s) whose labels are model predictions")
