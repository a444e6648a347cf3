"""HTML pages: the upload form and the result page."""

import base64
import functools
import logging
import re
import unicodedata

import markdown
from flask import Blueprint, abort, current_app, render_template, send_from_directory, url_for
from markupsafe import Markup

from app import get_predictor, request_id
from app.config import REPO_ROOT
from app.forms import ACCEPTED_NAMES, UploadForm, human_size, read_upload, the_upload
from model.cam import HEATMAP_COLORMAP, HEATMAP_THRESHOLD, THORAX_BOX, legend_image, to_png_bytes

MODEL_CARD_PATH = REPO_ROOT / "MODEL_CARD.md"
# The card's figures (confusion matrix, ROC, reliability), served beside the page it renders.
MODEL_CARD_FIGURES = REPO_ROOT / "docs" / "model"
# Classes that do not make a study urgent, as in batch triage (scripts/predict.py); every other class is urgent.
NON_URGENT_CLASSES = ("NORMAL",)
# Longest uploaded file name shown on the result page (the name is shown, never stored or logged).
SHOWN_FILENAME_LENGTH = 120

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
    flagged = bool(prediction.ood and prediction.ood.get("flagged"))
    return render_template(
        "result.html",
        prediction=prediction,
        flagged=flagged,
        class_names=predictor.class_names,
        urgent=prediction.label not in NON_URGENT_CLASSES,
        non_urgent_classes=NON_URGENT_CLASSES,
        film_uri=png_data_uri(prediction.film) if prediction.film is not None else None,
        heatmap_uri=png_data_uri(prediction.heatmap_layer) if prediction.heatmap_layer is not None else None,
        legend_uri=legend_uri(),
        heatmap_colormap=HEATMAP_COLORMAP,
        heatmap_threshold=HEATMAP_THRESHOLD,
        thorax_box=THORAX_BOX,
        thorax_box_on_film=[round(value * 1000) for value in prediction.thorax_box] if prediction.thorax_box else None,
        temperature=predictor.checkpoint.get("temperature"),
        filename=shown_filename(upload.filename),
        image_details=image_details(prediction.metadata),
    )


@bp.get("/model-card")
def model_card():
    """The shipped model's card, MODEL_CARD.md rendered as a page."""
    figures = url_for("views.model_card_figure", name="")
    card = re.sub(r'src="docs/model/([\w.-]+\.png)"', lambda match: f'src="{figures}{match.group(1)}"', model_card_html())
    return render_template("model_card.html", card=Markup(card))


@bp.get("/model-card/figures/<name>")
def model_card_figure(name):
    """One of the PNG figures the model card shows (send_from_directory refuses paths outside the folder)."""
    if not name.endswith(".png"):
        abort(404)
    return send_from_directory(MODEL_CARD_FIGURES, name)


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


def shown_filename(filename):
    """The uploaded file's name as the page shows it: its last path part, shortened when very long; None if absent."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    # control and format characters (NUL, bidi overrides) could hide or disguise part of the name
    name = "".join(char for char in name if not unicodedata.category(char).startswith("C")).strip()
    if not name:
        return None
    return name if len(name) <= SHOWN_FILENAME_LENGTH else name[: SHOWN_FILENAME_LENGTH - 1] + "…"


@functools.cache
def legend_uri():
    """The heatmap's colour scale as an inline PNG (the same for every page, so made once)."""
    return png_data_uri(legend_image())


@functools.cache
def model_card_html():
    """MODEL_CARD.md as HTML, rendered once per process (the file ships with the code).

    Table alignment becomes ``align`` attributes rather than ``style`` ones, which the strict CSP would block.
    """
    text = MODEL_CARD_PATH.read_text(encoding="utf-8")
    return markdown.markdown(
        text,
        extensions=["tables", "fenced_code", "toc", "sane_lists"],
        extension_configs={"tables": {"use_align_attribute": True}},
        output_format="html",
    )


def png_data_uri(image):
    """A PIL image as an inline ``data:image/png;base64,...`` URI (nothing is written to disk)."""
    return "data:image/png;base64," + base64.b64encode(to_png_bytes(image)).decode("ascii")
