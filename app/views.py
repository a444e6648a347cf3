"""HTML pages: the upload form and the result page."""

import base64
import logging

from flask import Blueprint, current_app, render_template

from app import get_predictor, request_id
from app.forms import ACCEPTED_NAMES, UploadForm, human_size, read_upload, the_upload
from model.cam import to_png_bytes

logger = logging.getLogger(__name__)

bp = Blueprint("views", __name__)


@bp.app_context_processor
def inject_model_info():
    """Model name and version for the footer of every page."""
    predictor = current_app.extensions.get("predictor")
    return {"model_info": predictor.model_info if predictor is not None else None}


@bp.get("/")
def index():
    """The upload form."""
    return render_upload_page()


@bp.post("/predict")
def predict():
    """Validate the upload, predict in memory and render the result; bad images are mapped in app.errors."""
    form = UploadForm()
    if not form.validate_on_submit():
        return render_upload_page(form, error=first_error(form)), 400
    upload = the_upload()  # the form field takes the first of several files; refuse the ambiguity instead
    predictor = get_predictor()
    prediction = predictor.predict_bytes(read_upload(upload), with_heatmap=True)
    logger.info("prediction %s in %.0f ms (form, request %s)", prediction.label, prediction.elapsed_ms, request_id())
    return render_template(
        "result.html",
        prediction=prediction,
        class_names=predictor.class_names,
        heatmap_uri=png_data_uri(prediction.heatmap) if prediction.heatmap is not None else None,
        image_details=image_details(prediction.metadata),
    )


# Technical facts about the upload that the result page may show (never patient or institution fields).
IMAGE_DETAIL_LABELS = (
    ("format", "Image format"),
    ("modality", "Modality"),
    ("view_position", "View position"),
    ("photometric_interpretation", "Photometric interpretation"),
    ("bits_stored", "Bits stored"),
    ("transfer_syntax", "Transfer syntax"),
    ("display_window", "Display window"),
)


def image_details(metadata):
    """(label, value) rows for the result page from the decoder's technical metadata."""
    rows = []
    if metadata.get("rows") and metadata.get("columns"):
        rows.append(("Image size", f"{metadata['columns']} × {metadata['rows']} pixels"))
    rows.extend((label, metadata[key]) for key, label in IMAGE_DETAIL_LABELS if metadata.get(key) not in (None, ""))
    return rows


def render_upload_page(form=None, error=None):
    """The upload page; ``error`` says why the last upload was refused (the caller sets the status)."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    return render_template(
        "index.html",
        form=form if form is not None else UploadForm(formdata=None),
        error=error,
        accepted_names=ACCEPTED_NAMES,
        upload_limit=human_size(limit) if limit else None,
    )


def first_error(form):
    """The first validation message of a form that did not validate."""
    messages = [message for field_messages in form.errors.values() for message in field_messages]
    return messages[0] if messages else "The upload could not be read; please try again."


def png_data_uri(image):
    """A PIL image as an inline ``data:image/png;base64,...`` URI (nothing is written to disk)."""
    return "data:image/png;base64," + base64.b64encode(to_png_bytes(image)).decode("ascii")
