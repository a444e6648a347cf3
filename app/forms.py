"""The upload form and the one list of file types the pages and the API advertise."""

from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from wtforms import SubmitField

from model.errors import InvalidImageError

# Upload types offered to people and clients; the decoder (model.transforms) has the final word on content.
# DICOM joins here when the decoder learns it: ("application/dicom", ".dcm").
ACCEPTED_TYPES = {
    "PNG": ("image/png", ".png"),
    "JPEG": ("image/jpeg", ".jpg", ".jpeg"),
}
ACCEPT_ATTRIBUTE = ",".join(item for items in ACCEPTED_TYPES.values() for item in items)
ACCEPTED_NAMES = " or ".join(ACCEPTED_TYPES)

EMPTY_FILE_MESSAGE = "The file is empty."


class UploadForm(FlaskForm):
    """One chest X-ray image, sent as multipart field ``file`` (the API uses the same name)."""

    file = FileField(
        "Chest X-ray image",
        validators=[FileRequired(f"Please choose a chest X-ray image ({ACCEPTED_NAMES}) to upload.")],
        render_kw={"accept": ACCEPT_ATTRIBUTE},
    )
    submit = SubmitField("Analyse image")


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
