"""Prometheus metrics; multi-process safe when PROMETHEUS_MULTIPROC_DIR is set (gunicorn workers)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

REQUESTS = Counter("slm_requests_total", "HTTP requests", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "slm_request_seconds",
    "HTTP request latency",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100),
)
PREDICTIONS = Counter("slm_predictions_total", "Tasks pre-annotated", ["project"])
PREDICT_DEFERRED = Counter("slm_predict_deferred_total",
                           "Tasks /predict left to a bulk job (PREDICT_BUDGET_SECONDS spent)")
PREDICTIONS_CACHED = Counter("slm_predictions_cached_total", "Tasks /predict answered from the prediction cache")
MODEL_LOAD = Gauge("slm_model_load_seconds", "Seconds the base model took to load", multiprocess_mode="max")
LABELS_STORED = Counter("slm_labels_stored_total", "Annotations written to the label store", ["project"])
WEBHOOKS = Counter("slm_webhooks_total", "Webhook events by action", ["action"])
TRAININGS_QUEUED = Counter("slm_training_triggers_total", "Training triggers by outcome", ["outcome"])
REJECTED = Counter("slm_overload_rejections_total",
                   "Predict requests refused with 503 (overload, model loading or busy)")


def render(*extra: Collector) -> tuple[bytes, str]:
    """This process's (or all gunicorn processes') metrics, then ``extra`` collectors (e.g. the store's)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    if extra:
        registry = CollectorRegistry(auto_describe=False)
        for collector in extra:
            registry.register(collector)
        body += generate_latest(registry)
    return body, CONTENT_TYPE_LATEST
