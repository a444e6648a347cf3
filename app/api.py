"""The JSON API for machine clients (exempt from CSRF) and the health check."""

import base64
import logging

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import ServiceUnavailable

from app import get_predictor, request_id
from app.forms import read_upload, the_upload
from model.cam import to_png_bytes

logger = logging.getLogger(__name__)

bp = Blueprint("api", __name__)

TRUE_VALUES = ("1", "true", "yes", "on")


@bp.post("/api/v1/predict")
def predict():
    """Multipart field ``file`` -> label, probabilities, model, timing, OOD verdict; ``?heatmap=1`` adds a PNG."""
    upload = the_upload()
    with_heatmap = request.args.get("heatmap", "").lower() in TRUE_VALUES
    predictor = get_predictor()
    prediction = predictor.predict_bytes(read_upload(upload), with_heatmap=with_heatmap)
    logger.info("prediction %s in %.0f ms (api, request %s)", prediction.label, prediction.elapsed_ms, request_id())
    answer = {
        "label": prediction.label,
        "probabilities": prediction.probabilities,
        "model": predictor.model_info,
        "elapsed_ms": round(prediction.elapsed_ms, 1),
        "warnings": list(prediction.warnings),
        "ood": prediction.ood,
        "image": prediction.metadata,
    }
    if with_heatmap:
        answer["heatmap"] = base64.b64encode(to_png_bytes(prediction.heatmap)).decode("ascii")
    return jsonify(answer)


@bp.get("/api/v1/model")
def model():
    """Identity of the loaded model."""
    return jsonify(get_predictor().model_info)


@bp.get("/healthz")
def healthz():
    """200 with the model's name and version once the model is loaded."""
    predictor = current_app.extensions.get("predictor")
    if predictor is None:
        raise ServiceUnavailable("The model is not loaded.")
    info = predictor.model_info
    return jsonify({"status": "ok", "model": {"name": info["name"], "version": info["version"]}})
