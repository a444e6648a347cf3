"""The PACS over DICOMweb (dicomweb-client): QIDO-RS to find images, WADO-RS to retrieve, STOW-RS to write back.

Only the fields the worklist keeps are read from QIDO answers (UIDs, accession number, study date, modality, SOP
class); the patient's name, ID and birth date that a PACS returns beside them are dropped here.
"""

import datetime
import email.parser
import email.policy
import io
import logging
import re
import urllib.parse

import pydicom
import requests
import requests.adapters
from dicomweb_client.api import DICOMwebClient
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

RADIOGRAPH_MODALITIES = ("CR", "DX")
QIDO_MODALITY_FILTER = ",".join(RADIOGRAPH_MODALITIES)  # DICOMweb's multi-value match (a backslash matches nothing)
# SOP classes never classified: structured reports, secondary captures (our own heatmaps among them).
SKIPPED_SOP_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7")
QIDO_PAGE = 500
TIMEOUT_SECONDS = 30
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Any transfer syntax: the stored one, no transcoding.
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'

TAG_SOP_CLASS, TAG_SOP_INSTANCE = "00080016", "00080018"
TAG_STUDY_DATE, TAG_ACCESSION, TAG_MODALITY = "00080020", "00080050", "00080060"
TAG_STUDY, TAG_SERIES = "0020000D", "0020000E"
TAG_STUDY_INSTANCES = "00201208"


class PacsUnavailable(ConnectionError):
    """The PACS did not answer (down, unreachable, overloaded); try again later."""


class PacsError(RuntimeError):
    """The PACS answered, but refused the request (e.g. an image deleted between finding and retrieving it)."""


def value(attributes, tag):
    """The first value of a tag in a DICOM JSON object, or None."""
    values = attributes.get(tag, {}).get("Value") or [None]
    return values[0]


def parse_study_date(text):
    """A DICOM DA value as a date, or None when absent or malformed."""
    try:
        return datetime.datetime.strptime(str(text), "%Y%m%d").date() if text else None
    except ValueError:
        return None


def image_row(attributes):
    """The worklist's fields of one QIDO instance answer (no patient data), or None for an unusable answer."""
    row = {
        "sop_instance_uid": value(attributes, TAG_SOP_INSTANCE),
        "series_instance_uid": value(attributes, TAG_SERIES),
        "study_instance_uid": value(attributes, TAG_STUDY),
        "accession_number": (value(attributes, TAG_ACCESSION) or None),
        "study_date": parse_study_date(value(attributes, TAG_STUDY_DATE)),
        "modality": value(attributes, TAG_MODALITY),
    }
    if not (row["sop_instance_uid"] and row["series_instance_uid"] and row["study_instance_uid"]):
        return None
    if row["accession_number"]:
        row["accession_number"] = str(row["accession_number"])[:16]
    return row


def is_classifiable(attributes):
    """A CR or DX image that is not a report or a secondary capture (our own output among them)."""
    modality = str(value(attributes, TAG_MODALITY) or "").upper()
    sop_class = str(value(attributes, TAG_SOP_CLASS) or "")
    return modality in RADIOGRAPH_MODALITIES and not sop_class.startswith(SKIPPED_SOP_CLASS_PREFIXES)


def multipart_parts(response):
    """The bodies of a multipart/related HTTP response, in order (parsed by the standard library's MIME parser)."""
    content_type = response.headers.get("Content-Type", "")
    if not content_type.lower().startswith("multipart/"):
        raise PacsError("the PACS did not answer with a multipart message")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + response.content
    )
    return [part.get_payload(decode=True) for part in message.iter_parts()]


class TimeoutAdapter(requests.adapters.HTTPAdapter):
    """An HTTP adapter with a default timeout for requests that set none."""

    def __init__(self, timeout, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


class PacsClient:
    """One DICOMweb PACS; ``url`` is its DICOMweb root (for Orthanc ``http://HOST:8042/dicom-web``)."""

    def __init__(self, url, *, timeout=TIMEOUT_SECONDS):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        adapter = TimeoutAdapter(timeout)  # dicomweb-client sets no timeout: a hung PACS must not hang the worker
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.client = DICOMwebClient(self.url, session=self.session)
        self.client.set_http_retry_params(retry=False)
        self._orthanc = None

    @property
    def server_root(self):
        """The URL with the DICOMweb root stripped (``/dicom-web`` off the end): Orthanc's REST root."""
        parts = urllib.parse.urlsplit(self.url)
        path = parts.path.rstrip("/")
        if "/" in path.strip("/"):
            path = path.rsplit("/", 1)[0]
        else:
            path = ""
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))

    def is_orthanc(self):
        """Whether the PACS is Orthanc (its REST API answers ``/system`` with a version); asked once."""
        if self._orthanc is None:
            try:
                answer = self._get_json(f"{self.server_root}/system")
                self._orthanc = isinstance(answer, dict) and "Version" in answer and "ApiVersion" in answer
            except PacsError:
                self._orthanc = False
        return self._orthanc

    def _get(self, url, params=None, headers=None):
        """GET a URL; ``PacsUnavailable`` when the server cannot be reached or fails, ``PacsError`` unless 200."""
        try:
            response = self.session.get(url, params=params, headers=headers, timeout=self.timeout)
        except requests.RequestException as error:
            raise PacsUnavailable(f"the PACS at {self.server_root} does not answer ({type(error).__name__})") from error
        if response.status_code >= 500:
            raise PacsUnavailable(f"the PACS at {self.server_root} answered HTTP {response.status_code}")
        if response.status_code != 200:
            raise PacsError(f"the PACS answered HTTP {response.status_code}")
        return response

    def _get_json(self, url, params=None):
        """GET a JSON document."""
        response = self._get(url, params=params)
        try:
            return response.json()
        except ValueError as error:
            raise PacsError("the PACS answered something that is not JSON") from error

    def _call(self, function, *args, **kwargs):
        """Run a dicomweb-client call, turning transport failures into ``PacsUnavailable``/``PacsError``."""
        try:
            return function(*args, **kwargs)
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else 0
            if status >= 500 or status == 0:
                raise PacsUnavailable(f"the PACS at {self.url} answered HTTP {status}") from error
            raise PacsError(f"the PACS answered HTTP {status}") from error
        except requests.RequestException as error:
            raise PacsUnavailable(f"the PACS at {self.url} does not answer ({type(error).__name__})") from error

    # ----------------------------------------------------------------- QIDO / WADO / STOW

    def find_images(self, study_instance_uid):
        """The classifiable images of one study, as worklist rows (QIDO-RS, CR/DX only)."""
        rows = []
        offset = 0
        while True:
            answers = self._call(self.client.search_for_instances, study_instance_uid=study_instance_uid,
                search_filters={"Modality": QIDO_MODALITY_FILTER},
                fields=[TAG_SOP_CLASS, TAG_ACCESSION, TAG_STUDY_DATE, TAG_MODALITY], limit=QIDO_PAGE, offset=offset,
            )
            for attributes in answers:
                row = image_row(attributes) if is_classifiable(attributes) else None
                if row:
                    rows.append(row)
            if len(answers) < QIDO_PAGE:
                return rows
            offset += len(answers)

    def find_studies(self, since_date):
        """(Study Instance UID, number of instances) of studies with a radiograph dated ``since_date`` or later."""
        studies = []
        offset = 0
        while True:
            answers = self._call(self.client.search_for_studies,
                search_filters={"StudyDate": f"{since_date:%Y%m%d}-", "ModalitiesInStudy": QIDO_MODALITY_FILTER},
                fields=[TAG_STUDY_INSTANCES], limit=QIDO_PAGE, offset=offset,
            )
            for attributes in answers:
                uid = value(attributes, TAG_STUDY)
                if uid:
                    studies.append((uid, int(value(attributes, TAG_STUDY_INSTANCES) or 0)))
            if len(answers) < QIDO_PAGE:
                return studies
            offset += len(answers)

    def retrieve(self, image):
        """The full DICOM dataset of one image (WADO-RS)."""
        return self.retrieve_uids(image.study_instance_uid, image.series_instance_uid, image.sop_instance_uid)

    def retrieve_uids(self, study_instance_uid, series_instance_uid, sop_instance_uid):
        """The full DICOM dataset of one instance given by its UIDs (WADO-RS, in its stored transfer syntax).

        dicomweb-client's own ``retrieve_instance`` refuses a part without the 128-byte preamble, and Orthanc hands
        back what it was sent: an instance STOWed without a preamble (dicomweb-client sends them so) would be
        unreadable. The parts are therefore read here, leniently.
        """
        uids = (study_instance_uid, series_instance_uid, sop_instance_uid)
        if not all(UID_PATTERN.match(str(uid or "")) for uid in uids):
            raise PacsError("not a valid DICOM UID")
        url = "{}/studies/{}/series/{}/instances/{}".format(self.url, *uids)
        response = self._get(url, headers={"Accept": DICOM_ACCEPT})
        parts = multipart_parts(response)
        if len(parts) != 1:
            raise PacsError(f"the PACS returned {len(parts)} objects for one instance")
        try:
            return pydicom.dcmread(io.BytesIO(parts[0]), force=True)
        except (InvalidDicomError, ValueError, EOFError, OSError) as error:
            raise PacsError("the PACS returned an object that is not DICOM") from error

    def store(self, datasets):
        """Send datasets into the PACS (STOW-RS); ``PacsError`` when the PACS refuses one."""
        answer = self._call(self.client.store_instances, list(datasets))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise PacsError(f"the PACS refused {len(failed)} of the result objects")
        return answer

    # ----------------------------------------------------------------- Orthanc's REST API

    def orthanc_changes(self, since, limit=200):
        """One page of Orthanc's ``/changes`` feed after sequence number ``since``."""
        return self._get_json(f"{self.server_root}/changes", params={"since": int(since), "limit": int(limit)})

    def orthanc_last_change(self):
        """The sequence number of Orthanc's latest change."""
        return int(self._get_json(f"{self.server_root}/changes", params={"last": ""}).get("Last", 0))

    def orthanc_study_uid(self, orthanc_id):
        """The Study Instance UID of an Orthanc study id, or None when the study is gone."""
        try:
            answer = self._get_json(f"{self.server_root}/studies/{urllib.parse.quote(orthanc_id)}")
        except PacsError:
            return None
        return (answer.get("MainDicomTags") or {}).get("StudyInstanceUID")
