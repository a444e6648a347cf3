"""Keep values from image files out of every log: library log records and Python warnings lose what they quote.

pydicom, Pillow and the JPEG decoders may quote a header value in a warning ("Invalid value for VR IS:
'Doe^Jane'"), and a DICOM header is patient data. The app, batch triage and the PACS worker install this guard
at start-up, before any file is read.
"""

import logging
import re
import warnings
from pathlib import Path

# Libraries that read image files: their log messages and warnings may quote a value from the file (pydicom's
# "Invalid value for VR IS: 'Doe^Jane'"), so what follows a colon and anything in quotes is withheld.
UPLOAD_READING_LIBRARIES = ("pydicom", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls", "highdicom",
                            "dicomweb_client")
WITHHELD = "<value withheld>"
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")
_warnings_logger = logging.getLogger("covidscan.library")


def without_values(message):
    """A library message with the values it may quote from an upload withheld (text after the first colon, quotes)."""
    head, colon, _ = str(message).partition(":")
    head = _QUOTED.sub(WITHHELD, head).strip()
    return f"{head}: {WITHHELD}" if colon else head


def install_log_guard(warnings_logger=None):
    """Rewrite upload-reading libraries' log records, and log every Python warning through ``without_values``
    (to ``warnings_logger``, by default ``covidscan.library``).

    Idempotent; applies to the whole process (one app per gunicorn worker, one worker per process).
    """
    global _warnings_logger
    if warnings_logger is not None:
        _warnings_logger = warnings_logger
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "covidscan_guard", False):
        def guarded_record(*args, **kwargs):
            record = factory(*args, **kwargs)
            if record.name.split(".")[0] in UPLOAD_READING_LIBRARIES:
                record.msg, record.args = without_values(record.getMessage()), ()
            return record

        guarded_record.covidscan_guard = True
        logging.setLogRecordFactory(guarded_record)
    warnings.showwarning = log_warning


def log_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` replacement: category, module and the message without values."""
    module = Path(str(filename)).stem
    _warnings_logger.warning("%s in %s: %s", getattr(category, "__name__", "Warning"), module,
                           without_values(message))
