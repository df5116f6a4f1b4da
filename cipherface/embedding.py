"""Face embeddings through DeepFace, with offline weights and typed errors.

Images are decoded here (OpenCV), not by DeepFace, so that files, queue payloads
and uploads all go through one path with one set of size limits and one error
type that names the input. The model registry lists the models CipherFace
supports; thresholds come from DeepFace's own table, never copied.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cipherface.exceptions import (
    EmbeddingError,
    ImageDecodeError,
    MissingWeightsError,
    NoFaceError,
    UnknownModelError,
)

__all__ = [
    "DEFAULT_DETECTOR",
    "DEFAULT_MODEL",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MODELS",
    "Embedder",
    "EmbeddingCache",
    "Face",
    "ModelSpec",
    "decode_image",
    "install_weights",
    "largest_face",
    "model_spec",
    "threshold",
    "weights_dir",
]

log = logging.getLogger(__name__)

#: Dlib is the default because its weights ship in a PyPI package
#: (face-recognition-models), so it is the one model that works offline.
DEFAULT_MODEL = "Dlib"
#: DeepFace's Haar-cascade detector: its files ship inside opencv < 5.
DEFAULT_DETECTOR = "opencv"
#: Larger inputs are refused before decoding: a probe is a photo, not an archive.
MAX_IMAGE_BYTES = 16 * 1024 * 1024
#: Decompression-bomb guard: a small file may still declare a huge canvas.
MAX_IMAGE_PIXELS = 40_000_000
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


def decode_image(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode JPEG/PNG/WebP/... bytes into a BGR array, or raise `ImageDecodeError`."""
    import cv2

    if not data:
        raise ImageDecodeError(f"{name}: empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageDecodeError(
            f"{name}: image of {len(data)} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit"
        )
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        if "MAX_IMAGE_PIXELS" in str(exc):
            raise ImageDecodeError(
                f"{name}: image exceeds the {MAX_IMAGE_PIXELS}-pixel limit"
            ) from exc
        raise ImageDecodeError(f"{name}: not a decodable image ({exc})") from exc
    if image is None:
        raise ImageDecodeError(f"{name}: not a decodable image (corrupt or unsupported format)")
    height, width = image.shape[:2]
    if height * width > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"{name}: {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit"
        )
    return image


def _read_image(source: str | os.PathLike[str] | bytes, name: str | None) -> tuple[np.ndarray, str]:
    if isinstance(source, bytes):
        label = name or "<bytes>"
        return decode_image(source, name=label), label
    path = Path(source)
    label = name or str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read image file ({exc.strerror})") from exc
    return decode_image(data, name=label), label


@dataclass(frozen=True, slots=True, kw_only=True)
class Face:
    """One face found in an image: its embedding and where it was found."""

    embedding: np.ndarray = field(repr=False)
    #: x, y, w, h of the detected face (and eye positions when the detector gives them).
    facial_area: Mapping[str, object]
    #: The detector's confidence; Haar cascades are not capped at 1.
    confidence: float


class Embedder:
    """Turns images into face embeddings with one DeepFace model and detector.

    DeepFace caches the loaded model process-wide, so many `Embedder` instances
    are cheap; the first embedding pays the model load.
    """

    def __init__(self, model: str = DEFAULT_MODEL, detector: str = DEFAULT_DETECTOR) -> None:
        self.spec = model_spec(model)
        self.detector = detector

    @property
    def model(self) -> str:
        """The DeepFace model name."""
        return self.spec.name

    def embed(
        self, image: str | os.PathLike[str] | bytes, *, name: str | None = None
    ) -> list[Face]:
        """Embed every face in an image (a path or encoded bytes).

        Raises `ImageDecodeError` for input that is not an image, `NoFaceError` when
        no face is found, and `MissingWeightsError` when the model cannot be loaded
        offline; each names the input.
        """
        pixels, label = _read_image(image, name)
        self._ensure_weights()
        from deepface import DeepFace
        from deepface.modules.exceptions import FaceNotDetected

        try:
            with _deepface_lock:
                results = DeepFace.represent(
                    pixels, model_name=self.spec.name, detector_backend=self.detector
                )
        except FaceNotDetected as exc:
            raise NoFaceError(f"{label}: no face detected") from exc
        except ValueError as exc:
            if "download" in str(exc):
                raise MissingWeightsError(
                    self.spec.name, self.spec.weights_file, str(weights_dir())
                ) from exc
            raise EmbeddingError(f"{label}: DeepFace failed: {exc}") from exc
        faces = [
            Face(
                embedding=np.asarray(r["embedding"], dtype=np.float64),
                facial_area=dict(r["facial_area"]),
                confidence=float(r["face_confidence"]),
            )
            for r in results
        ]
        if not faces:
            raise NoFaceError(f"{label}: no face detected")
        return faces

    def _ensure_weights(self) -> None:
        # Only Dlib's weights ship in a package; the others DeepFace downloads
        # itself where it can, and a failed download becomes MissingWeightsError.
        if self.spec.name == "Dlib":
            install_weights()


def largest_face(faces: Sequence[Face]) -> Face:
    """The face an image is about when it shows several: the largest detected."""

    def area(face: Face) -> float:
        box = face.facial_area
        return float(box.get("w", 0)) * float(box.get("h", 0))  # type: ignore[arg-type]

    return max(faces, key=area)


class EmbeddingCache:
    """Remembers the faces of recently seen image bytes (keyed by SHA-256).

    A redelivered probe, or the same photo probed again, costs a search instead
    of a second DeepFace pass; only successes are remembered.
    """

    def __init__(self, embedder: Embedder, size: int = 256) -> None:
        self.embedder = embedder
        self.size = size
        self._faces: OrderedDict[bytes, list[Face]] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, image: bytes, *, name: str | None = None) -> list[Face]:
        """Like `Embedder.embed` for encoded bytes, from the cache when possible."""
        key = hashlib.sha256(image).digest()
        with self._lock:
            if key in self._faces:
                self._faces.move_to_end(key)
                return self._faces[key]
        faces = self.embedder.embed(image, name=name)
        with self._lock:
            self._faces[key] = faces
            while len(self._faces) > self.size:
                self._faces.popitem(last=False)
        return faces
