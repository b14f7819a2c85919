"""Results as DICOM objects a PACS can store, linked to the image they describe (highdicom).

For one DICOM input and its :class:`~pneumoscan.prediction.Prediction`:

- **SR**, TID 1500 Measurement Report (Comprehensive 3D SR IOD, as highdicom writes TID 1500):
  one image-level measurement group (TID 1501) per *assessed* label, whose finding type is the
  label's code, with the probability and the operating threshold as measurements (UCUM "1"),
  "above operating threshold" Yes/No as a qualitative evaluation, the model as the algorithm
  identification (name, version = weights SHA-256, the threshold as a parameter) and the source
  image as the group's source; for every label explained by a Grad-CAM, a planar ROI group (TID
  1410) outlines its map's region (``cams[label].region``) as a SCOORD polyline on the source; one
  group per mask (lungs, heart) gives its quality and whether it passed its threshold; where the
  cardiothoracic ratio was measured, one more image-level group (finding type Heart) carries it
  as a numeric measurement (UCUM "1"), its method code naming the definition and the heart model
  as its algorithm (:mod:`pneumoscan.measure`). The observer
  is the device (PneumoScan), never a person. TID 1500
  was chosen over a free-form Comprehensive SR because viewers and archives already parse it and
  its image-level groups carry exactly "a value about this image, by this algorithm". Labels not
  assessed are left out (they are not results).
- **SEG**: the lung mask, binary, on the source image's pixel grid.
- **Secondary Capture**: the overlay picture (lung contour, crop box, Grad-CAM, caption), for
  viewers that show neither SR nor SEG.

All reference the source instance and copy its patient and study modules (highdicom does), with
new UIDs derived from the source SOP Instance UID, the kind and the models, so a rerun makes the
same UIDs (an archive stores it once). An image the input gate refused, or one scored with
``force``, gets only the Secondary Capture, whose caption says so: no SR or SEG asserts results
the gate did not stand behind.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pneumoscan import __version__
from pneumoscan.labels import LABELS
from pneumoscan.outputs.dicom_source import DicomOutputError, read_source
from pneumoscan.reading import VERDICTS

if TYPE_CHECKING:
    from pneumoscan.prediction import Prediction

MANUFACTURER = "PneumoScan"
SCHEME = "99PNEUMOSCAN"  # a private coding scheme ("99" prefix) for what SNOMED CT lacks here
#: SNOMED CT codes where pydicom's code dictionary (or, for pneumonia, SNOMED CT itself) has the
#: concept; the other labels use the private scheme with the label as meaning.
LABEL_CODES: dict[str, Code] = {
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "Pneumothorax": codes.SCT.Pneumothorax,
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    "Effusion": codes.SCT.PleuralEffusion,
    "Edema": codes.SCT.PulmonaryEdema,
    "Nodule": codes.SCT.Nodule,
}
PROBABILITY = codes.DCM.Probability
THRESHOLD = Code("OP_THRESHOLD", SCHEME, "Operating threshold")
ABOVE = Code("ABOVE_THRESHOLD", SCHEME, "Above operating threshold")
#: No DICOM, SNOMED CT or LOINC code is a chest-film cardiothoracic *diameter* ratio (LOINC's are
#: area and circumference ratios by ultrasound), so the private scheme names it and its method.
CTR = Code("CTR", SCHEME, "Cardiothoracic ratio")
CTR_METHOD = Code("CTR_MASK_WIDTHS", SCHEME, "Heart mask width / two-lung mask width (Danzer)")
#: The film's one verdict and the population it was read for (pneumoscan.reading).
VERDICT = Code("VERDICT", SCHEME, "Overall verdict")
VERDICT_VALUES = {v: Code(f"VERDICT_{v.upper().replace(' ', '_')}", SCHEME, v.capitalize()) for v in VERDICTS}
POPULATION = Code("POPULATION", SCHEME, "Population read for")
POPULATION_VALUES = {g: Code(f"POPULATION_{g.upper()}", SCHEME, g.capitalize()) for g in ("adult", "paediatric", "unknown")}
ESTIMATED_AGE = Code("ESTIMATED_AGE", SCHEME, "Age estimated from the film")
#: How far a mask can be trusted (pneumoscan.maskquality) and whether it passed its threshold.
MASK_QUALITY = Code("MASK_QUALITY", SCHEME, "Mask quality (PneumoScan mask-quality estimate)")
MASK_RELIABLE = Code("MASK_RELIABLE", SCHEME, "Mask reliable")
SERIES = {"sr": (9701, "PneumoScan findings (SR)"), "seg": (9702, "PneumoScan lung mask (SEG)"),
          "sc": (9703, "PneumoScan overlay (Secondary Capture)")}
def label_code(label: str) -> Code:
    return LABEL_CODES.get(label) or Code(label.upper(), SCHEME, label.replace("_", " "))


def derived_uid(source_uid: str, kind: str, *parts: str) -> str:
    """The same UID for the same source, kind and models: a rerun does not duplicate results."""
    return generate_uid(entropy_srcs=[source_uid, kind, *parts])


def _algorithm(meta: dict[str, Any], name: str, threshold: float | None = None, calibrated_for: str | None = None):
    import highdicom as hd

    parameters = [f"threshold={threshold:.6g}"] if threshold is not None else None
    if parameters:
        parameters.append(f"probability calibrated for: {calibrated_for}" if calibrated_for
                          else "probability not calibrated (raw score)")
    source = meta.get("threshold_provenance")
    if parameters and source:  # a site's calibration: the method and the parent model
        parameters.append(f"thresholds from {source['method']} on {source['images']} local films, "
                          f"parent {str(source['parent_model_sha256'])[:16]}")
    return hd.sr.AlgorithmIdentification(name=name, version=str(meta.get("weights_sha256", "unknown")),
                                         parameters=parameters)


def findings_sr(source: pydicom.Dataset, prediction: Prediction, classifier_meta: dict[str, Any], device_uid: str,
                heart_meta: dict[str, Any] | None = None, lung_meta: dict[str, Any] | None = None):
    """TID 1500 SR of the assessed labels' probabilities, thresholds and above/below, one region
    per Grad-CAM explanation, the masks' quality, and the cardiothoracic ratio where it was
    measured."""
    import highdicom as hd

    name = f"PneumoScan {classifier_meta.get('name', 'chest classifier')}"
    groups = []
    for label in LABELS:
        p, t = (prediction.probabilities or {}).get(label), (prediction.thresholds or {}).get(label)
        if p is None or t is None:
            continue
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(source.SOPInstanceUID, "tracking", label), identifier=label),
            finding_type=label_code(label),
            algorithm_id=_algorithm(classifier_meta, name, t, prediction.calibrated_for),
            measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(p), unit=codes.UCUM.NoUnits),
                          hd.sr.Measurement(name=THRESHOLD, value=float(t), unit=codes.UCUM.NoUnits)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                ABOVE, codes.SCT.Yes if label in (prediction.findings or []) else codes.SCT.No)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)]))
    if prediction.verdict is not None:
        groups.append(verdict_group(source, prediction, classifier_meta, name))
    for label, explanation in (prediction.cams or {}).items():
        if explanation.method == "grad-cam" and explanation.region and label in (prediction.thresholds or {}):
            groups.append(heat_map_region(source, prediction, label, explanation.region, classifier_meta, name))
    masks = prediction.mask_quality
    for structure, finding, meta, model in (("lungs", codes.SCT.Lung, lung_meta, "PneumoScan lung U-Net"),
                                            ("heart", codes.SCT.Heart, heart_meta, "PneumoScan heart U-Net")):
        quality = getattr(masks, structure, None)
        if masks is not None and quality is not None and meta is not None:
            groups.append(mask_quality_group(source, structure, finding, quality, masks.thresholds.get(structure),
                                             meta, model))
    ratio = prediction.measurements.ratio.value if prediction.measurements else None
    if ratio is not None and heart_meta is not None:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(source.SOPInstanceUID, "tracking", "CTR"), identifier="Cardiothoracic ratio"),
            finding_type=codes.SCT.Heart,
            algorithm_id=_algorithm(heart_meta, "PneumoScan heart U-Net"),
            measurements=[hd.sr.Measurement(name=CTR, value=float(ratio), unit=codes.UCUM.NoUnits,
                                            method=CTR_METHOD)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="PneumoScan", manufacturer_name=MANUFACTURER, model_name=name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    number, description = SERIES["sr"]
    models = classifier_meta.get("sha256", "") + (heart_meta or {}).get("sha256", "")
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, manufacturer=MANUFACTURER,
        series_instance_uid=derived_uid(source.SOPInstanceUID, "sr-series", models),
        sop_instance_uid=derived_uid(source.SOPInstanceUID, "sr", models),
        series_number=number, instance_number=1, is_complete=True)
    sr.SeriesDescription = description
    return sr


def verdict_group(source: pydicom.Dataset, prediction: Prediction, classifier_meta: dict[str, Any], name: str):
    """One image-level group for the film as a whole: the verdict (normal, abnormal,
    indeterminate), the population it was read for and, when estimated from the film, the age."""
    import highdicom as hd

    population, verdict = prediction.population, prediction.verdict
    if verdict is None:
        raise ValueError("a film without a verdict has no verdict group")
    group = population.group if population else "unknown"
    measurements = []
    if population and population.source == "estimate" and population.age is not None:
        age = round(float(population.age), 1)  # as the record shows it
        measurements.append(hd.sr.Measurement(name=ESTIMATED_AGE, value=age, unit=codes.UCUM.Year))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source.SOPInstanceUID, "tracking", "verdict"), identifier="Overall verdict"),
        finding_type=codes.SCT.Chest, algorithm_id=_algorithm(classifier_meta, name),
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(VERDICT, VERDICT_VALUES[verdict]),
                                 hd.sr.QualitativeEvaluation(
                                     POPULATION, POPULATION_VALUES.get(group, POPULATION_VALUES["unknown"]))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])


def heat_map_region(source: pydicom.Dataset, prediction: Prediction, label: str, region: list[int],
                    classifier_meta: dict[str, Any], name: str):
    """TID 1410 planar ROI group: where the Grad-CAM of ``label`` reaches half its maximum inside
    the lungs (its ``region``), as a closed POLYLINE in the source's pixel coordinates (PS3.3
    C.18.6.1.2: (0, 0) is the top-left corner of the top-left pixel), so a viewer can draw it."""
    import highdicom as hd

    x0, y0, x1, y1 = (float(v) for v in region)
    outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
    roi = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline,
                            source_image=hd.sr.SourceImageForRegion.from_source_image(source))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source.SOPInstanceUID, "tracking-region", label), identifier=f"{label} heat-map region"),
        referenced_region=roi, finding_type=label_code(label),
        algorithm_id=_algorithm(classifier_meta, name, (prediction.thresholds or {}).get(label)),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            ABOVE, codes.SCT.Yes if label in (prediction.findings or []) else codes.SCT.No)])


def mask_quality_group(source: pydicom.Dataset, structure: str, finding: Code, quality: float,
                       threshold: float | None, meta: dict[str, Any], model: str):
    """One image-level group per mask: its quality (UCUM "1") and, where the model carries a
    threshold, whether the mask passed it (an unreliable heart mask is why no ratio is given)."""
    import highdicom as hd

    from pneumoscan.maskquality import QualityRule

    reliable = QualityRule(threshold).reliable(quality)
    evaluations = None if reliable is None else [hd.sr.QualitativeEvaluation(
        MASK_RELIABLE, codes.SCT.Yes if reliable else codes.SCT.No)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source.SOPInstanceUID, "tracking", f"mask-{structure}"),
            identifier=f"{structure.capitalize()} mask quality"),
        finding_type=finding, algorithm_id=_algorithm(meta, model, threshold),
        measurements=[hd.sr.Measurement(name=MASK_QUALITY, value=float(quality), unit=codes.UCUM.NoUnits)],
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])


def lung_seg(source: pydicom.Dataset, mask: np.ndarray, lung_meta: dict[str, Any]):
    """Binary SEG of the lung mask on the source image's pixel grid."""
    import highdicom as hd

    if mask.shape != (int(source.Rows), int(source.Columns)):
        raise DicomOutputError(f"lung mask {mask.shape} does not match the source's {source.Rows}×{source.Columns}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="PneumoScan lung U-Net", family=codes.cid7162.ArtificialIntelligence,
        version=str(lung_meta.get("weights_sha256", "unknown")))
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Lungs", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Lung, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    number, series_description = SERIES["seg"]
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=mask.astype(bool)[None], segmentation_type="BINARY",
        segment_descriptions=[description],
        series_instance_uid=derived_uid(source.SOPInstanceUID, "seg-series", lung_meta.get("sha256", "")),
        sop_instance_uid=derived_uid(source.SOPInstanceUID, "seg", lung_meta.get("sha256", "")),
        series_number=number, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="PneumoScan lung U-Net", software_versions=__version__,
        device_serial_number="none", omit_empty_frames=False)
    seg.SeriesDescription = series_description
    if "FrameOfReferenceUID" not in source:  # a projection film: say how the grid is oriented
        seg.PatientOrientation = list(source.get("PatientOrientation") or ["L", "F"])
    return seg


def overlay_sc(source: pydicom.Dataset, picture_rgb: np.ndarray, models: str):
    """Secondary Capture of the overlay picture (RGB, 8 bits)."""
    import highdicom as hd

    number, description = SERIES["sc"]
    orientation = tuple(source.get("PatientOrientation") or ("L", "F"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.ascontiguousarray(picture_rgb, np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=orientation,
        series_instance_uid=derived_uid(source.SOPInstanceUID, "sc-series", models),
        sop_instance_uid=derived_uid(source.SOPInstanceUID, "sc", models),
        series_number=number, instance_number=1, manufacturer=MANUFACTURER)
    sc.SeriesDescription = description
    if source.get("BodyPartExamined"):  # the chest: an unpaired part, so no laterality is due
        sc.BodyPartExamined = source.BodyPartExamined
    else:
        sc.Laterality = ""  # unknown body part: present and empty, as Type 2C allows
    sc.DerivationDescription = "PneumoScan overlay: lung contour, crop box, Grad-CAM; research use only"
    reference = pydicom.Dataset()  # the film it was made from (General Image module, Type 3)
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def dicom_results(path: str | Path, prediction: Prediction, predictor, picture_bgr: np.ndarray) -> dict[str, Any]:
    """The SR, SEG and SC datasets for one DICOM input (only the SC when the gate refused it or
    it was forced)."""
    import cv2

    source = read_source(path)
    models = f"{predictor.segmenter.meta.get('sha256', '')}{predictor.classifier.meta.get('sha256', '')}"
    gate = prediction.quality
    with warnings.catch_warnings(action="ignore", category=UserWarning):  # they quote the source's values
        try:
            out = {"sc": overlay_sc(source, cv2.cvtColor(picture_bgr, cv2.COLOR_BGR2RGB), models)}
            if prediction.probabilities is not None and gate is not None and gate.frontal_chest and not gate.forced:
                device_uid = derived_uid("PneumoScan device", models)
                heart = getattr(predictor, "heart", None)
                out["sr"] = findings_sr(source, prediction, predictor.classifier.meta, device_uid,
                                        heart.meta if heart is not None else None, predictor.segmenter.meta)
                if prediction.mask is None:
                    raise ValueError("the lung mask was not kept (keep_arrays)")
                out["seg"] = lung_seg(source, prediction.mask, predictor.segmenter.meta)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # what highdicom finds wanting
            raise DicomOutputError(f"{Path(path).name}: the source lacks what DICOM results need "
                                   f"({type(exc).__name__}: {unquoted(str(exc))[:160]})") from exc
    return out


def unquoted(message: str) -> str:
    """A library's message without the values it quotes (they may be the patient's); DICOM
    keywords (``'Modality'``) stay, they say what is missing."""
    from pydicom.datadict import tag_for_keyword

    def keep(match: re.Match) -> str:
        text = match.group()[1:-1]
        return match.group() if tag_for_keyword(text) is not None or text.endswith("Dataset") else "'…'"

    return re.sub(r"'[^']*'|\"[^\"]*\"", keep, message)


def write_dicom_results(path: str | Path, prediction: Prediction, predictor, picture_bgr: np.ndarray,
                        out: str | Path) -> dict[str, Path]:
    """Write :func:`dicom_results` as ``<SOPInstanceUID>_{sr,seg,sc}.dcm`` in ``out``
    (each under a temporary name, fsynced and renamed: never half a file, and on disk before the
    listener's done-mark)."""
    from io import BytesIO

    from pneumoscan.modelfile import atomic_write_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, dataset in dicom_results(path, prediction, predictor, picture_bgr).items():
        target = out / f"{dataset.SOPInstanceUID}_{kind}.dcm"
        buffer = BytesIO()
        with warnings.catch_warnings(action="ignore", category=UserWarning):  # e.g. an over-long PatientID
            pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
        atomic_write_bytes(target, buffer.getvalue())
        written[kind] = target
    return written
