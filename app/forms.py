"""The upload form and the one list of file types the pages and the API advertise."""

from flask import request
from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from werkzeug.exceptions import BadRequest
from wtforms import PasswordField, SubmitField
from wtforms.validators import DataRequired, Length

from model.errors import InvalidImageError

# Upload types offered to people and clients; the decoder (model.decode) has the final word on content.
# DICOM is recognised by its content (the DICM preamble), so extensionless PACS exports work too.
ACCEPTED_TYPES = {
    "PNG": ("image/png", ".png"),
    "JPEG": ("image/jpeg", ".jpg", ".jpeg"),
    "DICOM": ("application/dicom", ".dcm"),
}
ACCEPT_ATTRIBUTE = ",".join(item for items in ACCEPTED_TYPES.values() for item in items)
ACCEPTED_NAMES = ", ".join(list(ACCEPTED_TYPES)[:-1]) + " or " + list(ACCEPTED_TYPES)[-1]

EMPTY_FILE_MESSAGE = "The file is empty."
NO_FILE_MESSAGE = "No file was uploaded: send the image as multipart/form-data in a field named 'file'."
UNREADABLE_FORM_MESSAGE = (
    "The upload could not be read: its multipart form data is malformed or its part headers (such as the file "
    "name) are not UTF-8 text. Rename the file with plain letters and digits, or send it again from a browser."
)


class UploadRefused(BadRequest):
    """400 for a request without exactly one upload; answered like a refused image (the form comes back)."""


class UploadForm(FlaskForm):
    """One chest X-ray image, sent as multipart field ``file`` (the API uses the same name)."""

    file = FileField(
        "Chest X-ray image",
        validators=[FileRequired(f"Please choose a chest X-ray image ({ACCEPTED_NAMES}) to upload.")],
        render_kw={"accept": ACCEPT_ATTRIBUTE},
    )
    submit = SubmitField("Analyse image")


class LoginForm(FlaskForm):
    """Sign-in for the pages: one of the configured API tokens, exchanged for a session (``POST /login``)."""

    token = PasswordField(
        "Access token",
        validators=[DataRequired("Please enter your access token."), Length(max=512, message="That is not a token.")],
        render_kw={"autocomplete": "current-password"},
    )
    submit = SubmitField("Sign in")


def the_upload():
    """The one file of the current request's field ``file``; ``UploadRefused`` when there is none or several."""
    uploads = request.files.getlist("file")
    if not uploads and getattr(request, "multipart_unreadable", False):
        raise UploadRefused(UNREADABLE_FORM_MESSAGE)
    if not uploads:
        raise UploadRefused(NO_FILE_MESSAGE)
    if len(uploads) > 1:
        raise UploadRefused(f"Send one image per request; this request has {len(uploads)} files in the field 'file'.")
    return uploads[0]


def read_upload(storage):
    """Read an uploaded file into memory (it is never saved); raise ``InvalidImageError`` when it is empty."""
    data = storage.read()
    if not data:
        raise InvalidImageError(EMPTY_FILE_MESSAGE)
    return data


def human_size(byte_count):
    """A byte count for people: 1536 -> '1.5 KB', 67108864 -> '64 MB'."""
    size = float(byte_count)
    for unit in ("bytes", "KB", "MB"):
        if size < 1024 or unit == "MB":
            break
        size /= 1024
    if unit == "bytes" or size == int(size):
        return f"{size:.0f} {unit}"
    return f"{size:.1f} {unit}"
