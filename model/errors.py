"""Named exceptions of the model package, mapped to HTTP codes by the web layer."""


class CovidScanError(Exception):
    """Base class for errors this project raises on purpose."""


class InvalidImageError(CovidScanError):
    """The uploaded bytes are not a usable image (corrupt, truncated, absurd size...)."""

    status_code = 400


class UnsupportedImageError(InvalidImageError):
    """The bytes are a well-formed file of a type we do not accept."""

    status_code = 415


class CheckpointError(CovidScanError):
    """A checkpoint file is missing, damaged, foreign or of an unsupported format."""


class WeightsError(CovidScanError):
    """Initial weights (``--weights``) cannot be loaded into the requested architecture."""


class DataError(CovidScanError):
    """A dataset folder does not have the expected layout."""
