"""DICOM Segmentation objects (highdicom) for masks predicted on a DICOM radiograph.

A PACS viewer shows a DICOM-SEG over the image it references. :func:`write_dicom_seg`
writes one binary segment per structure: its label (the name asked for), its
segmented property category (SCT 123037004 "Anatomical Structure") and type (the
registry's SNOMED CT code where one exists, else SCT 91723000 "Anatomical
structure"), the algorithm (automatic, named after the checkpoint) and a reference
to the source image (study, series and SOP instance). :func:`read_dicom_seg` reads
one back into masks in segment order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")  # segmented property category
GENERIC_TYPE = ("91723000", "Anatomical structure")  # type of a structure without its own code


class DicomSegError(ValueError):
    """A DICOM-SEG that cannot be written or read; the message names the file."""


def write_dicom_seg(source: str | Path, masks: np.ndarray, labels: Sequence[str],
                    codes: Sequence[tuple[str, str] | None], out_path: str | Path, algorithm: str = "CheXanatomy",
                    algorithm_version: str = "1") -> Path:
    """Write a DICOM Segmentation of ``masks`` over the DICOM radiograph ``source``.

    masks: bool [S, H, W] at the source image's size (rows, columns); labels: [S] segment
    labels; codes: [S] SNOMED CT ``(code, meaning)`` or None (generic type). Empty masks
    are written as empty segments. Returns ``out_path``.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes as dcm_codes

    src = Path(source)
    try:
        ds = pydicom.dcmread(str(src))
    except Exception as err:  # noqa: BLE001  NOTE: pydicom raises many types
        raise DicomSegError(f"{src}: not a readable DICOM file ({err})") from None
    m = np.asarray(masks, dtype=bool)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if m.ndim != 3 or m.shape[1:] != (rows, cols) or len(m) != len(labels) or len(labels) != len(codes):
        raise DicomSegError(f"{src}: need masks [S, {rows}, {cols}] with one label and code each; got {m.shape}, "
                            f"{len(labels)} labels, {len(codes)} codes")
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version=algorithm_version,
                                              family=dcm_codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for k, (label, code) in enumerate(zip(labels, codes)):
        value, meaning = code or GENERIC_TYPE
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=k + 1, segment_label=str(label)[:64],
            segmented_property_category=hd.sr.CodedConcept(ANATOMICAL_STRUCTURE[0], "SCT", ANATOMICAL_STRUCTURE[1]),
            segmented_property_type=hd.sr.CodedConcept(value, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo))
    # NOTE: a projection radiograph has a pixel spacing but no slice thickness; highdicom
    # 0.28 copies the spacing into a Pixel Measures Sequence without SliceThickness and then
    # refuses to read its own file back. The segmentation is an overlay in pixel space
    # (the frame of the source image), so it is written without pixel measures.
    source_for_seg = ds.copy()
    for kw in ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"):
        if kw in source_for_seg and "FrameOfReferenceUID" not in source_for_seg:
            delattr(source_for_seg, kw)
    try:
        seg = hd.seg.Segmentation(
            source_images=[source_for_seg], pixel_array=np.moveaxis(m, 0, -1)[None].astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=int(ds.get("SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="CheXanatomy companion",
            manufacturer_model_name=algorithm, software_versions=_own_version(), device_serial_number="0",
            series_description=f"{algorithm} segmentation", omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise DicomSegError(f"{src}: cannot build a DICOM Segmentation over this image: {err}") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out))
    return out


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chexanatomy")
    except PackageNotFoundError:
        return "0"


def read_dicom_seg(path: str | Path) -> tuple[list[str], np.ndarray, str]:
    """Read a DICOM-SEG written by :func:`write_dicom_seg` (single-frame source):
    ``(labels [S], masks bool [S, H, W], referenced source SOP Instance UID)``."""
    import highdicom as hd

    p = Path(path)
    try:
        seg = hd.seg.segread(str(p))
    except Exception as err:  # noqa: BLE001
        raise DicomSegError(f"{p}: not a readable DICOM Segmentation ({err})") from None
    numbers = list(seg.segment_numbers)
    labels = [seg.get_segment_description(n).segment_label for n in numbers]
    uid = str(seg.SourceImageSequence[0].ReferencedSOPInstanceUID) if "SourceImageSequence" in seg else \
        str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=numbers)
    return labels, np.moveaxis(np.asarray(pixels[0]) > 0, -1, 0), uid
