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
    """Multipart field ``file`` -> label, probabilities, model, timing, OOD verdict; ``?heatmap=1`` adds a PNG and
    the share of its heat inside the central thorax box (``thorax_share``, as the result page shows it).

    ``label`` is null when the OOD check flags the image; its probabilities and the verdict are still given.
    """
    upload = the_upload()
    with_heatmap = request.args.get("heatmap", "").lower() in TRUE_VALUES
    predictor = get_predictor()
    prediction = predictor.predict_bytes(read_upload(upload), with_heatmap=with_heatmap)
    flagged = bool(prediction.ood and prediction.ood.get("flagged"))
    logger.info("prediction %s in %.0f ms (api, request %s)", "withheld (flagged)" if flagged else prediction.label,
                prediction.elapsed_ms, request_id())
    answer = {
        # A flagged image (out of distribution or failed input checks) gets no class: the one rule everywhere.
        "label": None if flagged else prediction.label,
        "probabilities": prediction.probabilities,
        "model": predictor.model_info,
        "elapsed_ms": round(prediction.elapsed_ms, 1),
        "warnings": list(prediction.warnings),
        "ood": prediction.ood,
        "image": prediction.metadata,
    }
    if with_heatmap:
        answer["heatmap"] = base64.b64encode(to_png_bytes(prediction.heatmap)).decode("ascii")
        answer["thorax_share"] = None if prediction.thorax_share is None else round(prediction.thorax_share, 3)
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
