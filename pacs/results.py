"""The result objects written back into a study: a TID 1500 Comprehensive SR and a Secondary Capture heatmap.

The SR follows IHE AI Results (AIR): the algorithm's name and version, the probability of each class, the most
likely class (or that the input was out of distribution), ``VerificationFlag`` UNVERIFIED, and "research use only"
in the series description. UIDs are derived from the source image's SOP Instance UID and the model's checksum, so
writing a result twice (a worker killed between the STOW and the database update) stores the same objects again
rather than a second copy.
"""

import dataclasses
import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

logger = logging.getLogger(__name__)

MANUFACTURER = "CovidScan"
SERIES_DESCRIPTION_SR = "CovidScan AI triage result - research use only"
SERIES_DESCRIPTION_HEATMAP = "CovidScan AI heatmap - research use only"
SR_SERIES_NUMBER = 9901
HEATMAP_SERIES_NUMBER = 9902
OUTPUT_MODALITIES = frozenset({"SR", "OT"})
CODING_SCHEME = "99COVIDSCAN"  # private coding scheme for the model's own classes and findings
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
MOST_LIKELY_CLASS = hd.sr.CodedConcept("MOST-LIKELY-CLASS", CODING_SCHEME, "Most likely class")
OUT_OF_DISTRIBUTION = hd.sr.CodedConcept("OUT-OF-DISTRIBUTION", CODING_SCHEME, "Input out of distribution")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


@dataclasses.dataclass(frozen=True)
class ResultUids:
    """The UIDs of the objects written back for one source image."""

    sr_series: str
    sr_instance: str
    heatmap_series: str
    heatmap_instance: str


def result_uids(source_sop_instance_uid, model_sha256):
    """Deterministic UIDs for the SR and heatmap of one image under one model (idempotent write-back)."""
    def uid(kind):
        return generate_uid(entropy_srcs=[MANUFACTURER, kind, source_sop_instance_uid, str(model_sha256)])

    return ResultUids(uid("sr-series"), uid("sr-instance"), uid("heatmap-series"), uid("heatmap-instance"))


# Type 2 attributes that highdicom copies from the source into its objects; a source may lack them.
TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                     "StudyTime", "ReferringPhysicianName", "AccessionNumber")


def evidence_header(source):
    """The source's header without its pixels, with empty values for missing Type 2 study attributes."""
    header = Dataset()
    for element in source:
        if element.keyword != "PixelData":
            header.add(element)
    header.file_meta = getattr(source, "file_meta", FileMetaDataset())
    for keyword in TYPE2_FROM_SOURCE:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def class_code(name):
    """The coded concept of one of the model's classes."""
    return hd.sr.CodedConcept(name.upper()[:16], CODING_SCHEME, name)


def build_sr(source, prediction, model_info, uids):
    """A Comprehensive SR (TID 1500 measurement report) of ``prediction`` about the ``source`` dataset."""
    source = evidence_header(source)
    algorithm = hd.sr.AlgorithmIdentification(name=str(model_info["name"]), version=str(model_info["version"]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[MANUFACTURER, "device", str(model_info.get("sha256"))]),
            name=str(model_info["name"]), manufacturer_name=MANUFACTURER, model_name=str(model_info["arch"]),
        ),
    )
    measurements = [
        hd.sr.Measurement(
            name=hd.sr.CodedConcept(f"PROB-{name.upper()}"[:16], CODING_SCHEME, f"Probability of {name}"),
            value=float(probability), unit=NO_UNITS, algorithm_id=algorithm,
        )
        for name, probability in prediction.probabilities.items()
    ]
    flagged = bool(prediction.ood and prediction.ood.get("flagged"))
    evaluations = [hd.sr.QualitativeEvaluation(OUT_OF_DISTRIBUTION, codes.SCT.Yes if flagged else codes.SCT.No)]
    if not flagged:
        evaluations.append(hd.sr.QualitativeEvaluation(MOST_LIKELY_CLASS, class_code(prediction.label)))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[uids.sr_instance, "tracking"]), identifier="CovidScan chest X-ray triage"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report, series_instance_uid=uids.sr_series, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance, instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,  # VerificationFlag UNVERIFIED: no reader has signed it
        series_description=SERIES_DESCRIPTION_SR,
        software_versions=str(model_info["version"]), manufacturer_model_name=str(model_info["name"]),
    )


def build_heatmap(source, heatmap, model_info, uids):
    """A Secondary Capture (RGB) of the class-activation overlay, in its own series of the source's study."""
    source = evidence_header(source)
    pixels = np.ascontiguousarray(np.asarray(heatmap.convert("RGB"), dtype=np.uint8))
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=uids.heatmap_series, series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=uids.heatmap_instance, instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"), series_description=SERIES_DESCRIPTION_HEATMAP,
        software_versions=str(model_info["version"]), manufacturer_model_name=str(model_info["name"]),
    )
