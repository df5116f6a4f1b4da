"""Detection without DeepFace's border where measured unneeded (dlib): the same faces;
dlib's doublings before its scan chosen by the caller."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deepface import DeepFace
from deepface.modules import modeling
from deepface.modules.verification import find_cosine_distance

from cipherface.config import Settings
from cipherface.detection import _dlib_regions, detect_and_embed
from cipherface.embedding import (
    DEFAULT_DETECTOR,
    DEFAULT_MODEL,
    MAX_IMAGE_SIDE,
    Embedder,
    install_weights,
    load_image,
    threshold,
)
from cipherface.exceptions import ConfigError, NoFaceError


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], int]]:
    """Every image dlib's HOG detector scans, with the doublings asked for."""
    install_weights()
    parts = modeling.build_model(task="face_detector", model_name="dlib").model
    hog = parts["face_detector"]
    seen: list[tuple[tuple[int, ...], int]] = []

    class Spy:
        def run(self, image: np.ndarray, upsample: int) -> object:
            seen.append((image.shape, upsample))
            return hog.run(image, upsample)

    monkeypatch.setitem(parts, "face_detector", Spy())
    return seen


def test_detector_scans_the_working_image_not_a_padded_one(
    faces_dir: Path, scans: list[tuple[tuple[int, ...], int]]
) -> None:
    # DeepFace.represent hands the detector the image with a 50% black border on
    # each side: 4x the pixels for dlib's HOG to scan.
    data = (faces_dir / "couple.jpg").read_bytes()
    working = load_image(data, max_side=MAX_IMAGE_SIDE).pixels

    assert len(Embedder().embed(data)) == 2
    assert scans == [(working.shape, 1)]


@pytest.mark.parametrize("photo", ["img1.jpg", "couple.jpg", "selfie-many-people.jpg"])
def test_dlib_regions_are_deepfaces_own(faces_dir: Path, photo: str) -> None:
    # Run here only to choose the doublings; at DeepFace's one, nothing else differs.
    install_weights()
    pixels = load_image((faces_dir / photo).read_bytes(), max_side=MAX_IMAGE_SIDE).pixels
    theirs = modeling.build_model(task="face_detector", model_name="dlib").detect_faces(pixels)

    assert theirs and _dlib_regions(pixels, 1) == theirs


def test_fewer_doublings_miss_only_faces_below_the_scan(
    faces_dir: Path, small_portrait: bytes, scans: list[tuple[tuple[int, ...], int]]
) -> None:
    data = (faces_dir / "img1.jpg").read_bytes()
    once, never = Embedder(), Embedder(upsample=0)
    (a,), (b,) = once.embed(data), never.embed(data)
    assert find_cosine_distance(a.embedding, b.embedding) < threshold(DEFAULT_MODEL, "cosine") / 4

    (face,) = once.embed(small_portrait)
    assert 60 <= min(face.box[2:]) < 80
    with pytest.raises(NoFaceError):
        never.embed(small_portrait)
    assert [upsample for _, upsample in scans] == [1, 0, 1, 0]


def test_doublings_are_dlibs_and_bounded() -> None:
    assert Embedder().upsample == 1 and Settings().embedder().upsample == 1
    assert Settings.from_env({"CIPHERFACE_DETECT_UPSAMPLE": "0"}).embedder().upsample == 0
    for bad in (-1, 3):
        with pytest.raises(ConfigError, match="upsample must be 0 to 2"):
            Embedder(upsample=bad)
        with pytest.raises(ConfigError, match="upsample must be 0 to 2"):
            Settings(detect_upsample=bad)
    # The Haar cascade has no such step: refused, not ignored.
    with pytest.raises(ConfigError, match="dlib's; the detector is 'opencv'"):
        Embedder(detector="opencv", upsample=0)
    with pytest.raises(ConfigError, match="dlib's"):
        Settings(detector="opencv", detect_upsample=1)
    # The cascade has none, and an embedding pool passes on what its embedder holds.
    cascade = Embedder(detector="opencv")
    assert cascade.upsample is None
    assert Embedder(detector="opencv", upsample=cascade.upsample).upsample is None


@pytest.mark.parametrize("photo", ["img1.jpg", "couple.jpg", "img12.jpg"])
def test_same_faces_and_embeddings_as_deepface_represent(faces_dir: Path, photo: str) -> None:
    install_weights()
    pixels = load_image((faces_dir / photo).read_bytes(), max_side=MAX_IMAGE_SIDE).pixels
    reference = DeepFace.represent(
        pixels, model_name=DEFAULT_MODEL, detector_backend=DEFAULT_DETECTOR
    )
    faces = detect_and_embed(pixels, model=DEFAULT_MODEL, detector=DEFAULT_DETECTOR)

    assert len(faces) == len(reference)
    for theirs in reference:
        area = theirs["facial_area"]
        centre = (area["x"] + area["w"] / 2, area["y"] + area["h"] / 2)
        # dlib's HOG scans a different pyramid on a different canvas: the box moves by
        # a few pixels, the face and its embedding stay (well inside the threshold).
        (ours,) = [
            f
            for f in faces
            if abs(f.facial_area["x"] + f.facial_area["w"] / 2 - centre[0]) < area["w"] / 4
            and abs(f.facial_area["y"] + f.facial_area["h"] / 2 - centre[1]) < area["h"] / 4
        ]
        distance = find_cosine_distance(ours.embedding, np.asarray(theirs["embedding"]))
        assert distance < threshold(DEFAULT_MODEL, "cosine") / 2
        assert ours.facial_area["left_eye"] is not None
        assert ours.facial_area["right_eye"] is not None


def test_other_detectors_keep_deepfaces_border_and_results(faces_dir: Path) -> None:
    # The Haar cascade loses edge faces without the border (README, "Face detection").
    install_weights()
    pixels = load_image((faces_dir / "couple.jpg").read_bytes(), max_side=MAX_IMAGE_SIDE).pixels
    reference = DeepFace.represent(pixels, model_name=DEFAULT_MODEL, detector_backend="opencv")
    faces = detect_and_embed(pixels, model=DEFAULT_MODEL, detector="opencv")

    assert [f.facial_area for f in faces] == [r["facial_area"] for r in reference]
    for ours, theirs in zip(faces, reference, strict=True):
        np.testing.assert_array_equal(ours.embedding, theirs["embedding"])
        assert ours.confidence == theirs["face_confidence"]
