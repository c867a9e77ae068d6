"""Results a PACS can keep: a rendered overlay as a DICOM Secondary Capture object.

The object is an RGB Secondary Capture Image (PS3.3 A.8.1) with new SOP Instance and Series
UIDs, filed under its source: the source's Study Instance UID, its Patient module and its
General Study attributes, and a reference to the source image (and frame). Its series
description names the model, layer, method and target. This is the one place where the
source's identifying attributes leave the engine, inside the object, as they must to file it.

``BurnedInAnnotation`` says whether the pixels may identify the patient: the overlay is the
source's pixels under a heatmap, so it is ``NO`` only when the source says ``NO``; a source that
says ``YES``, or does not say, may carry burned-in text, and so may the overlay.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from service.engine.imaging.dicom_decoding import DicomSource
from service.errors import InvalidImageError

#: Media type of a DICOM file (RFC 3240).
DICOM_MEDIA_TYPE = "application/dicom"
MANUFACTURER = "gradcam-service"

#: Patient module attributes copied from the source, so that the object files under the same
#: patient (type 2 ones are written empty when the source lacks them), and the de-identification
#: attributes, which must stay true of anything derived from a de-identified source.
_PATIENT_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_PATIENT_OTHER = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthTime",
    "OtherPatientIDsSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "QualityControlSubject",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
#: General Study module attributes (type 2 ones written empty when absent).
_STUDY_TYPE_2 = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_STUDY_OTHER = ("StudyDescription", "IssuerOfAccessionNumberSequence")
_LO_MAX = 64


@dataclass(frozen=True)
class CaptureContent:
    """What the captured picture shows: which model explained which class, where, how."""

    model: str
    layer: str
    method: str
    target: str
    probability: float

    def series_description(self) -> str:
        """At most 64 characters (an LO value), no backslash (the value separator)."""
        text = f"{self.method} {self.target} | {self.model} {self.layer}".replace("\\", "/")
        return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."

    def derivation(self) -> str:
        return (
            f"Class activation map ({self.method}) of model {self.model} at layer {self.layer}"
            f" for class {self.target} (probability {self.probability:.4f}), blended over the"
            " source image as displayed (windowed)."
        )


def secondary_capture(
    picture: np.ndarray,
    source: DicomSource,
    content: CaptureContent,
    *,
    now: datetime | None = None,
) -> bytes:
    """The bytes of a DICOM Part 10 file holding ``picture`` (HxWx3 uint8 RGB) as a Secondary
    Capture object derived from ``source``."""
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"a Secondary Capture needs an HxWx3 uint8 picture, got {picture.shape}")
    try:
        return _write(picture, source, content, now)
    except MemoryError:
        raise
    except Exception:
        # pydicom's message may quote the attribute it failed on: neither it nor its traceback
        # may travel on (from None), as a patient's data would reach the logs with it.
        raise InvalidImageError(
            "The uploaded DICOM object's patient and study attributes could not be written into"
            " a Secondary Capture; ask for another overlay.",
            code="dicom_header_unwritable",
        ) from None


def _write(
    picture: np.ndarray, source: DicomSource, content: CaptureContent, now: datetime | None
) -> bytes:
    header = source.header
    stamp = (now or datetime.now(UTC)).astimezone()
    date, time = stamp.strftime("%Y%m%d"), stamp.strftime("%H%M%S.%f")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: any source name can be written
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    _copy(ds, header, _PATIENT_TYPE_2, empty_if_absent=True)
    _copy(ds, header, _PATIENT_OTHER)
    ds.StudyInstanceUID = (
        header.StudyInstanceUID if "StudyInstanceUID" in header else generate_uid()
    )
    _copy(ds, header, _STUDY_TYPE_2, empty_if_absent=True)
    _copy(ds, header, _STUDY_OTHER)

    ds.Modality = "OT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = None  # type 2: present, empty
    ds.SeriesDescription = content.series_description()
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "WSD"  # workstation
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER

    ds.InstanceNumber = 1
    ds.PatientOrientation = None  # type 2C, required for Secondary Capture: present, empty
    ds.ContentDate, ds.ContentTime = date, time
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = content.derivation()
    ds.ImageComments = content.derivation()
    ds.BurnedInAnnotation = "NO" if _says_no(header, "BurnedInAnnotation") else "YES"
    if "RecognizableVisualFeatures" in header:
        ds.RecognizableVisualFeatures = header.RecognizableVisualFeatures
    lossy = str(header.get("LossyImageCompression", "")).strip() == "01"
    ds.LossyImageCompression = "01" if lossy else "00"
    if "SOPClassUID" in header and "SOPInstanceUID" in header:
        ds.SourceImageSequence = Sequence([_reference(source)])

    ds.set_pixel_data(np.ascontiguousarray(picture), "RGB", 8, generate_instance_uid=False)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _copy(
    target: Dataset, source: Dataset, keywords: tuple[str, ...], *, empty_if_absent: bool = False
) -> None:
    for keyword in keywords:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
        elif empty_if_absent:
            setattr(target, keyword, None)


def _says_no(header: Dataset, keyword: str) -> bool:
    return str(header.get(keyword, "")).strip().upper() == "NO"


def _reference(source: DicomSource) -> Dataset:
    """The Source Image Sequence item naming the explained image (and frame)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.header.SOPClassUID
    item.ReferencedSOPInstanceUID = source.header.SOPInstanceUID
    if source.description.number_of_frames > 1:
        item.ReferencedFrameNumber = source.description.frame + 1  # frames count from 1
    return item
