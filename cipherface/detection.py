"""Detect, align and embed faces with DeepFace's parts, without its 50% padding.

``DeepFace.represent`` pads the image with a black border of half its width and
height on each side before detection, so that rotating a face near the edge into
alignment does not cut it. DeepFace 0.0.103 no longer needs that: it aligns each
face on a sub-image of its own, filled with black where it leaves the image
(``extract_sub_image``). The padding still costs 4x the pixels in detection, and
dlib's HOG upsamples 2x on top: 4096x4096 scanned for a 1,024 px image instead of
2048x2048 (benchmarks/bench_images.py: CPU seconds before and after, README
"Face detection"). So dlib runs on the image as it is, and DeepFace's own
alignment and embedding run on the faces it found. Other detectors keep the
border (`BORDERS`): the Haar cascade found 2 fewer faces and 1 false one in
selfie-many-people.jpg without it (benchmarks/bench_detectors.py).

dlib's detector is run here rather than through DeepFace, which always doubles the
image before scanning (``upsample`` 1): that finds faces down to about 40 px but
costs about 4x a scan at the image's own size, which finds them down to about 80 px:
more than half of a photo's embedding CPU (README, "Face detection": upsampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cipherface.exceptions import ConfigError

if TYPE_CHECKING:
    # Imported where used: DeepFace imports cv2, whose pixel cap
    # cipherface.embedding sets first.
    from deepface.models.Detector import FacialAreaRegion

__all__ = [
    "BORDERS",
    "DEFAULT_BORDER",
    "DLIB_UPSAMPLE",
    "UPSAMPLE_RANGE",
    "Detection",
    "detect_and_embed",
    "detector_upsample",
]

#: The black border added on each side before detection, as a fraction of the
#: image's width and height: DeepFace's, unless measured to be unneeded.
DEFAULT_BORDER = 0.5
#: Per detector, by benchmarks/bench_detectors.py: dlib found the same faces on the
#: shared photos without it (same accuracy on the 520 pairs), at a quarter of the pixels.
BORDERS = {"dlib": 0.0}
#: How often dlib's HOG detector doubles the image before scanning, unless asked
#: otherwise: DeepFace's choice, so every face it found is still found.
DLIB_UPSAMPLE = 1
#: The doublings before dlib's scan `Embedder` accepts: each one finds faces half
#: as large at 4x the cost, so 2 already scans 16x the pixels of 0.
UPSAMPLE_RANGE = range(3)


def detector_upsample(detector: str, upsample: int | None) -> int | None:
    """The doublings before ``detector``'s scan: ``upsample``, or dlib's default for None.

    Only dlib's HOG detector has the step (None for the others); asking another
    detector for it is a `ConfigError` rather than a setting silently ignored.
    """
    if detector != "dlib" and upsample is None:
        return None
    if upsample is None:
        return DLIB_UPSAMPLE
    if detector != "dlib":
        raise ConfigError(f"upsampling before detection is dlib's; the detector is {detector!r}")
    if upsample not in UPSAMPLE_RANGE:
        raise ConfigError(
            f"upsample must be {UPSAMPLE_RANGE.start} to {UPSAMPLE_RANGE.stop - 1}, got {upsample}"
        )
    return upsample


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    """One face as DeepFace would report it, in the working image's pixels."""

    embedding: np.ndarray = field(repr=False)
    #: ``x``, ``y``, ``w``, ``h``, ``left_eye``, ``right_eye`` (an eye outside the image is None).
    facial_area: dict[str, object]
    #: The detector's score, rounded as ``DeepFace.represent`` rounds it.
    confidence: float


def detect_and_embed(
    pixels: np.ndarray, *, model: str, detector: str, upsample: int | None = None
) -> list[Detection]:
    """Every face ``detector`` finds in BGR ``pixels``, aligned and embedded by ``model``.

    What ``DeepFace.represent(pixels, model, detector)`` returns, but with the border
    of `BORDERS` and, for dlib, ``upsample`` doublings before the scan (None:
    `DLIB_UPSAMPLE`; other detectors have no such step, and
    `cipherface.embedding.Embedder` refuses it for them); no face is an empty list.
    DeepFace's errors propagate (a weight file it cannot download is a
    ``ValueError``): the caller names the input.
    """
    # cv2 only here: cipherface.embedding sets OpenCV's pixel cap before its first import.
    import cv2
    from deepface import DeepFace
    from deepface.modules import detection, modeling

    height, width = pixels.shape[:2]
    border = BORDERS.get(detector, DEFAULT_BORDER)
    across, down = int(border * width), int(border * height)
    canvas = cv2.copyMakeBorder(
        pixels, down, down, across, across, cv2.BORDER_CONSTANT, value=(0, 0, 0)
    )
    found = (
        _dlib_regions(canvas, DLIB_UPSAMPLE if upsample is None else upsample)
        if detector == "dlib"
        else modeling.build_model(task="face_detector", model_name=detector).detect_faces(canvas)
    )
    faces = []
    for region in found:
        # Boxes and eyes come back in the working image's pixels (the border taken off).
        face = detection.extract_face(
            facial_area=region,
            img=canvas,
            align=True,
            expand_percentage=0,
            width_border=across,
            height_border=down,
            detector_backend=detector,
        )
        if face.img.shape[0] == 0 or face.img.shape[1] == 0:
            continue
        area = face.facial_area
        x, y = max(0, int(area.x)), max(0, int(area.y))
        eyes = {
            key: (int(eye[0]), int(eye[1]))
            if detection.is_valid_landmark(eye, width, height)
            else None
            for key, eye in (("left_eye", area.left_eye), ("right_eye", area.right_eye))
        }
        # "skip" embeds the array as the face; the scaling to [0, 1] is what
        # DeepFace's own detection path does before the model resizes it.
        (represented,) = DeepFace.represent(
            face.img / 255, model_name=model, detector_backend="skip"
        )
        faces.append(
            Detection(
                embedding=np.asarray(represented["embedding"], dtype=np.float64),
                facial_area={
                    "x": x,
                    "y": y,
                    "w": min(width - x - 1, int(area.w)),
                    "h": min(height - y - 1, int(area.h)),
                    **eyes,
                },
                confidence=round(float(area.confidence or 0), 2),
            )
        )
    return faces


def _dlib_regions(image: np.ndarray, upsample: int) -> list[FacialAreaRegion]:
    """dlib's HOG faces in ``image`` as DeepFace's dlib detector reports them.

    The same boxes (clipped to the image), eye centres (the 5-point shape
    predictor's two points per eye) and confidence (the HOG score clamped to
    [0, 1]); only the number of doublings before the scan is ours to choose.
    """
    from deepface.models.Detector import FacialAreaRegion
    from deepface.modules import modeling

    parts = modeling.build_model(task="face_detector", model_name="dlib").model
    rectangles, scores, _ = parts["face_detector"].run(image, upsample)
    height, width = image.shape[:2]
    regions = []
    for rectangle, score in zip(rectangles, scores, strict=True):
        x, y = max(0, rectangle.left()), max(0, rectangle.top())
        marks = parts["sp"](image, rectangle)
        regions.append(
            FacialAreaRegion(
                x=x,
                y=y,
                w=min(rectangle.right(), width) - x,
                h=min(rectangle.bottom(), height) - y,
                # The person's left eye: points 0-1 of dlib's 5-point model.
                left_eye=_midpoint(marks, 0, 1),
                right_eye=_midpoint(marks, 2, 3),
                confidence=min(max(0.0, score), 1.0),
            )
        )
    return regions


def _midpoint(marks: Any, first: int, second: int) -> tuple[int, int]:
    """The middle of two of a dlib shape's points, in whole pixels."""
    a, b = marks.part(first), marks.part(second)
    return ((a.x + b.x) // 2, (a.y + b.y) // 2)
