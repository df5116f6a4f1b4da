"""Face embeddings through DeepFace, with offline weights and typed errors.

Images are decoded here (OpenCV), not by DeepFace, so that files, queue payloads
and uploads all go through one path with one set of size limits and one error
type that names the input. The model registry lists the models CipherFace
supports; thresholds come from DeepFace's own table, never copied.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cipherface.detection import detect_and_embed, detector_upsample
from cipherface.exceptions import (
    ConfigError,
    EmbeddingError,
    ImageDecodeError,
    MissingWeightsError,
    NoFaceError,
    UnknownModelError,
    UnsupportedImageError,
)

__all__ = [
    "DEFAULT_DETECTOR",
    "DEFAULT_MODEL",
    "FACE_FILTERS",
    "IMAGE_FORMATS",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "MODELS",
    "Embedder",
    "Face",
    "FaceFilter",
    "ModelSpec",
    "Picture",
    "decode_image",
    "image_format",
    "image_size",
    "install_weights",
    "largest_face",
    "load_image",
    "model_spec",
    "threshold",
    "weights_dir",
]

log = logging.getLogger(__name__)

#: Dlib is the default because its weights ship in a PyPI package
#: (face-recognition-models), so it is the one model that works offline.
DEFAULT_MODEL = "Dlib"
#: dlib's HOG detector, chosen by benchmarks/bench_detectors.py (README, "Face detection"):
#: 99.6% on the labelled pairs against 95.6% for the Haar cascade ("opencv"), and no false
#: face after the filter. Its shape predictor ships in face-recognition-models too.
DEFAULT_DETECTOR = "dlib"
#: Larger inputs are refused before decoding: a probe is a photo, not an archive.
MAX_IMAGE_BYTES = 16 * 1024 * 1024
#: Decompression-bomb guard: a small file may still declare a huge canvas.
MAX_IMAGE_PIXELS = 40_000_000
#: Faces are detected on images downscaled to this longest side. Detection cost grows
#: with the pixels (dlib's HOG upsamples 2x; DeepFace's border, where kept, is 4x more):
#: at 1,920 px dlib took 4-7 s per large image here, at 1,024 px about 1.2 s (both with the
#: border), with the same faces found on the shared photos (bench_images.py, bench_detectors.py).
MAX_IMAGE_SIDE = 1024
#: Below this longest side no face is big enough for a usable embedding.
MIN_IMAGE_SIDE = 64
# OpenCV reads this once, when cv2 is first imported, and then refuses to allocate
# a larger canvas; the check after decoding stays for when cv2 came in first.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """What CipherFace needs to know about one DeepFace recognition model."""

    name: str
    dimensions: int
    #: The file DeepFace loads from its weights folder for this model.
    weights_file: str


MODELS: Mapping[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(name="VGG-Face", dimensions=4096, weights_file="vgg_face_weights.onnx"),
        ModelSpec(name="Facenet", dimensions=128, weights_file="facenet_weights.onnx"),
        ModelSpec(name="Facenet512", dimensions=512, weights_file="facenet512_weights.onnx"),
        ModelSpec(name="ArcFace", dimensions=512, weights_file="arcface_weights.onnx"),
        ModelSpec(
            name="Dlib", dimensions=128, weights_file="dlib_face_recognition_resnet_model_v1.dat"
        ),
        ModelSpec(name="SFace", dimensions=128, weights_file="face_recognition_sface_2021dec.onnx"),
    )
}

#: Files the face-recognition-models package ships that DeepFace looks for by name.
_PACKAGED_WEIGHTS = (
    "dlib_face_recognition_resnet_model_v1.dat",
    "shape_predictor_5_face_landmarks.dat",
)

_install_lock = threading.Lock()
#: DeepFace shares its detectors and models process-wide and they are not
#: thread-safe: concurrent calls were seen to miss faces. One call at a time.
_deepface_lock = threading.Lock()


def model_spec(name: str) -> ModelSpec:
    """Look a model up in the registry, or raise `UnknownModelError` listing the choices."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown face-recognition model {name!r}; choose one of {', '.join(MODELS)}"
        ) from None


def threshold(model: str, metric: str) -> float:
    """DeepFace's tuned decision threshold for a model and a distance metric."""
    from deepface.modules.verification import find_threshold

    model_spec(model)
    try:
        return float(find_threshold(model, metric))
    except ValueError as exc:
        raise UnknownModelError(f"DeepFace has no {metric} threshold for {model}") from exc


def weights_dir() -> Path:
    """The folder DeepFace loads weights from: ``$DEEPFACE_HOME/.deepface/weights``."""
    return Path(os.environ.get("DEEPFACE_HOME", Path.home())) / ".deepface" / "weights"


def install_weights() -> list[Path]:
    """Copy the weights shipped by ``face-recognition-models`` to DeepFace's folder.

    Idempotent and cheap when already done. This is what makes the Dlib model run
    with no network: DeepFace finds the files by name and skips its download.
    """
    import face_recognition_models

    source = Path(face_recognition_models.__file__).parent / "models"
    target = weights_dir()
    placed = []
    with _install_lock:
        target.mkdir(parents=True, exist_ok=True)
        for name in _PACKAGED_WEIGHTS:
            dest = target / name
            if not dest.is_file() or dest.stat().st_size != (source / name).stat().st_size:
                # Copy then rename: a reader never sees a half-written weight file.
                partial = dest.with_suffix(".partial")
                shutil.copyfile(source / name, partial)
                partial.replace(dest)
                log.info("placed %s in %s", name, target)
            placed.append(dest)
    return placed


#: The formats a probe or an enrolment photo may be in, by their magic bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WebP")
#: Other kinds of file recognised by their magic bytes, so a refusal can name them.
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
)


def image_format(data: bytes) -> str:
    """Name the kind of file ``data`` is, from its first bytes.

    One of `IMAGE_FORMATS` for an accepted image; otherwise a name for the
    refusal message ("GIF", "HEIF", "text", "unknown binary data", ...).
    """
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for magic, kind in _OTHER_SIGNATURES:
        if data.startswith(magic):
            return kind
    if data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00":  # reserved bytes are zero
        return "BMP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
            return "HEIF"
        return "ISO media (video?)"
    try:
        # Incremental: a character cut at byte 512 is not a decoding error.
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:512])
    except UnicodeDecodeError:
        return "unknown binary data"
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return "unknown binary data"


def image_size(data: bytes, *, name: str = "<bytes>") -> tuple[int, int]:
    """Width and height an image declares in its header, read without decoding it.

    This is what lets the pixel cap (and the reduced-resolution decode) act before
    any pixel buffer is allocated.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as header:
            return header.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (89 / 179 megapixels) is above ours: over it is over ours.
        raise ImageDecodeError(f"{name}: image exceeds the {MAX_IMAGE_PIXELS}-pixel limit") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            f"{name}: not a decodable {image_format(data)} image (unreadable header)"
        ) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Picture:
    """An image decoded for face detection: pixels no larger than detection needs.

    ``scale`` maps the working pixels back to the original (upright) image:
    a point (x, y) here is (x * scale, y * scale) there.
    """

    pixels: np.ndarray = field(repr=False)
    #: The size of the original image, upright (after its EXIF orientation).
    width: int
    height: int
    scale: float


def decode_image(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode JPEG, PNG or WebP bytes into a full-size BGR array.

    Raises `UnsupportedImageError` for other formats and `ImageDecodeError` for
    empty, truncated, corrupt or oversized input (bytes or declared pixels).
    """
    return load_image(data, name=name, max_side=None).pixels


def load_image(data: bytes, *, name: str = "<bytes>", max_side: int | None) -> Picture:
    """Decode an image within the caps, downscaled so its longest side is <= ``max_side``.

    The cost is bounded before decoding: the byte cap, the format whitelist and the
    pixel cap (from the header) all act first. JPEGs larger than needed are decoded
    at 1/2, 1/4 or 1/8 resolution by libjpeg itself, which never builds the
    full-size buffer; the rest is a resize.
    """
    import cv2

    if not data:
        raise ImageDecodeError(f"{name}: empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageDecodeError(
            f"{name}: image of {len(data)} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit"
        )
    kind = image_format(data)
    if kind not in IMAGE_FORMATS:
        raise UnsupportedImageError(name, kind, IMAGE_FORMATS)
    width, height = image_size(data, name=name)
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"{name}: {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit"
        )
    # Entropy-coded JPEG data cannot contain FF D9, so a file cut short has no
    # end-of-image marker after its last start-of-scan; libjpeg may pad the rest grey.
    if kind == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise ImageDecodeError(f"{name}: truncated JPEG (no end-of-image marker)")
    flag = cv2.IMREAD_COLOR
    if kind == "JPEG" and max_side is not None:
        for factor, reduced in (
            (8, cv2.IMREAD_REDUCED_COLOR_8),
            (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2),
        ):
            if max(width, height) >= factor * max_side:
                flag = reduced
                break
    try:
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error as exc:
        raise ImageDecodeError(f"{name}: not a decodable {kind} image ({exc})") from exc
    if pixels is None:
        raise ImageDecodeError(f"{name}: not a decodable {kind} image (corrupt or truncated)")
    longest = max(pixels.shape[:2])
    if max_side is not None and longest > max_side:
        ratio = max_side / longest
        size = (max(1, round(pixels.shape[1] * ratio)), max(1, round(pixels.shape[0] * ratio)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    # OpenCV applies the EXIF orientation; the header does not, so match the axes.
    if (pixels.shape[1] >= pixels.shape[0]) != (width >= height) and width != height:
        width, height = height, width
    return Picture(pixels=pixels, width=width, height=height, scale=width / pixels.shape[1])


def _read_image(
    source: str | os.PathLike[str] | bytes, name: str | None, max_side: int | None
) -> tuple[Picture, str]:
    if isinstance(source, bytes):
        label = name or "<bytes>"
        return load_image(source, name=label, max_side=max_side), label
    path = Path(source)
    label = name or str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read image file ({exc.strerror})") from exc
    return load_image(data, name=label, max_side=max_side), label


@dataclass(frozen=True, slots=True, kw_only=True)
class Face:
    """One face found in an image: its embedding and where it was found.

    Coordinates are the original image's pixels (upright), whatever size the
    detector worked at.
    """

    embedding: np.ndarray = field(repr=False)
    #: DeepFace's facial area: ``x``, ``y``, ``w``, ``h`` and ``left_eye`` /
    #: ``right_eye`` as (x, y) or None.
    facial_area: Mapping[str, object]
    #: The detector's confidence, as DeepFace reports it (see `DETECTORS`).
    confidence: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` of the face in the original image."""
        area = self.facial_area
        return (int(area["x"]), int(area["y"]), int(area["w"]), int(area["h"]))  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True, kw_only=True)
class FaceFilter:
    """What a detection must have to count as a face (see the README, "Face detection").

    Detectors report false faces: Haar cascades find "faces" in shirt collars and
    backdrops. Too small a face also makes a poor embedding whatever it is.
    """

    #: Shorter side of the box, in original pixels: Dlib's model is fed 150x150 chips.
    min_side: int = 60
    #: Shorter side of the box relative to the image's shorter side.
    min_fraction: float = 0.03
    #: Detector confidence as DeepFace reports it; None where it means nothing.
    min_confidence: float | None = None

    def admits(self, face: Face, width: int, height: int) -> bool:
        """Whether ``face`` (in original coordinates) passes in a ``width`` x ``height`` image."""
        side = min(face.box[2], face.box[3])
        if side < self.min_side or side < self.min_fraction * min(width, height):
            return False
        return self.min_confidence is None or face.confidence >= self.min_confidence


#: Per detector, tuned on the shared photos by benchmarks/bench_detectors.py. False faces
#: there were 43-58 px (Haar's also one of 96 and one of 152 px in 480x720); the smallest
#: true face 89 px, and none under 14% of its image's shorter side. Haar's "confidence"
#: ranks false faces above true ones (0.96-0.99 vs 0.86-0.95), so it is not used; dlib's
#: HOG score put its false face at 0.0 and the weakest true one at 0.25.
FACE_FILTERS: Mapping[str, FaceFilter] = {
    "opencv": FaceFilter(),
    "dlib": FaceFilter(min_confidence=0.1),
    # DeepFace already drops MediaPipe detections under 0.7.
    "mediapipe": FaceFilter(),
}


class Embedder:
    """Turns images into face embeddings with one DeepFace model and detector.

    DeepFace caches the loaded model process-wide, so many `Embedder` instances
    are cheap; the first embedding pays the model load.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        detector: str = DEFAULT_DETECTOR,
        *,
        max_side: int = MAX_IMAGE_SIDE,
        face_filter: FaceFilter | None = None,
        upsample: int | None = None,
    ) -> None:
        if max_side < MIN_IMAGE_SIDE:
            raise ConfigError(f"max_side must be at least {MIN_IMAGE_SIDE} px, got {max_side}")
        self.spec = model_spec(model)
        self.detector = detector
        #: Detection runs on images downscaled to this longest side.
        self.max_side = max_side
        #: dlib: doublings before the scan (`detector_upsample`; 0 finds faces down to
        #: about 80 px of the working image at a quarter of the cost of 1, about 40 px);
        #: None for detectors without the step.
        self.upsample = detector_upsample(detector, upsample)
        self.face_filter = face_filter or FACE_FILTERS.get(detector, FaceFilter())

    @property
    def model(self) -> str:
        """The DeepFace model name."""
        return self.spec.name

    def embed(
        self, image: str | os.PathLike[str] | bytes, *, name: str | None = None
    ) -> list[Face]:
        """Embed every face in an image (a path or encoded bytes), in detector order.

        Each `Face` carries its box in the original image's pixels, the detector's
        confidence and the embedding; detections that fail `face_filter` are dropped.
        Raises `UnsupportedImageError` / `ImageDecodeError` for input that is not an
        accepted image, `NoFaceError` when no face is found, and `MissingWeightsError`
        when the model cannot be loaded offline; each names the input.
        """
        picture, label = _read_image(image, name, self.max_side)
        self._ensure_weights()
        try:
            with _deepface_lock:
                results = detect_and_embed(
                    picture.pixels,
                    model=self.spec.name,
                    detector=self.detector,
                    upsample=self.upsample,
                )
        except ValueError as exc:
            if "download" in str(exc):
                raise MissingWeightsError(
                    self.spec.name, self.spec.weights_file, str(weights_dir())
                ) from exc
            raise EmbeddingError(f"{label}: DeepFace failed: {exc}") from exc
        found = [
            Face(
                embedding=r.embedding,
                facial_area=_rescale(r.facial_area, picture.scale),
                confidence=r.confidence,
            )
            for r in results
        ]
        faces = [f for f in found if self.face_filter.admits(f, picture.width, picture.height)]
        if not faces:
            dropped = f" ({len(found)} too small or unsure)" if found else ""
            raise NoFaceError(f"{label}: no face detected{dropped}")
        if len(faces) < len(found):
            log.debug("%s: dropped %d of %d detections", label, len(found) - len(faces), len(found))
        return faces

    def _ensure_weights(self) -> None:
        # Dlib's weights (and dlib's detector's shape predictor) ship in a package; the
        # others DeepFace downloads itself where it can, and a failed download becomes
        # MissingWeightsError.
        if self.spec.name == "Dlib" or self.detector == "dlib":
            install_weights()


def _rescale(area: Mapping[str, object], scale: float) -> dict[str, object]:
    """DeepFace's facial area, from working pixels to the original image's."""
    scaled: dict[str, object] = {}
    for key, value in area.items():
        if isinstance(value, (int, float)):
            scaled[key] = round(value * scale)
        elif isinstance(value, (tuple, list)):
            scaled[key] = tuple(round(v * scale) for v in value)
        else:
            scaled[key] = value
    return scaled


def largest_face(faces: Sequence[Face]) -> Face:
    """The face an image is about when it shows several: the largest detected."""

    def area(face: Face) -> float:
        box = face.facial_area
        return float(box.get("w", 0)) * float(box.get("h", 0))  # type: ignore[arg-type]

    return max(faces, key=area)
