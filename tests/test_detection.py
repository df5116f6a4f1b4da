"""Detection without DeepFace's border where measured unneeded (dlib): the same faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deepface import DeepFace
from deepface.modules import modeling
from deepface.modules.verification import find_cosine_distance

from cipherface.detection import detect_and_embed
from cipherface.embedding import (
    DEFAULT_DETECTOR,
    DEFAULT_MODEL,
    MAX_IMAGE_SIDE,
    Embedder,
    install_weights,
    load_image,
    threshold,
)


def test_detector_scans_the_working_image_not_a_padded_one(
    faces_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DeepFace.represent hands the detector the image with a 50% black border on
    # each side: 4x the pixels for dlib's HOG to scan.
    detector = modeling.build_model(task="face_detector", model_name=DEFAULT_DETECTOR)
    scanned: list[tuple[int, ...]] = []
    detect = detector.detect_faces
    monkeypatch.setattr(
        detector, "detect_faces", lambda img: scanned.append(img.shape) or detect(img)
    )
    data = (faces_dir / "couple.jpg").read_bytes()
    working = load_image(data, max_side=MAX_IMAGE_SIDE).pixels

    assert len(Embedder().embed(data)) == 2
    assert scanned == [working.shape]


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
