"""The judge server: one model (a base, optionally with a LoRA adapter) behind the OpenAI chat-completions API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from slm_annotator.backend.openai_api import Judge, error_response
from slm_annotator.backend.openai_api import bp as openai_bp

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 1024 * 1024


def load_judge_model(base_model: str, model_dir: Path, quantization: str, device: str, adapter: str | None = None
                     ) -> tuple[Any, Any, torch.device, str]:
    """(model, tokenizer, device, short name), with the same loading code as the backend."""
    from slm_annotator.model.loader import load_base

    base = load_base(base_model, model_dir, quantization, device)
    if not adapter:
        return base.model, base.tokenizer, base.device, base.name
    from peft import PeftModel

    model = PeftModel.from_pretrained(base.model, adapter).eval()
    log.info("loaded adapter %s", adapter)
    return model, base.tokenizer, base.device, f"{base.name}-{Path(adapter).name}"


def create_judge_app(model: Any, tokenizer: Any, device: torch.device, model_name: str, api_key: str = "") -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["judge"] = Judge(model, tokenizer, device, model_name, api_key)
    app.register_blueprint(openai_bp)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        """Unknown routes, wrong methods, oversized bodies: the OpenAI error shape too, so clients parse them."""
        return error_response(exc.code or 500, exc.description or exc.name)

    return app
