"""Per-face results on real photos: one face per person, boxes where the people are.

The shared multi-face photos are unlabelled, so people are composed from labelled
portraits here (side by side, at different sizes), and the three multi-face photos
are checked against face centres counted by eye (as in benchmarks/bench_detectors.py).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from deepface.modules.verification import find_cosine_distance

from cipherface.embedding import DEFAULT_DETECTOR, Embedder, Face, largest_face, threshold

#: Face centres (x, y in original pixels) counted by eye; see the benchmark's MULTI_FACE.
MULTI_FACE = {
    "couple.jpg": [(690, 870), (1670, 750)],
    "selfie-many-people.jpg": [
        (35, 290),
        (20, 490),
        (145, 365),
        (258, 180),
        (410, 198),
        (560, 140),
        (547, 413),
    ],
    "img11_reflection.jpg": [(594, 516)],
}
#: How many of those faces the default detector finds after its filter (README table).
FOUND_BY_DEFAULT = {"couple.jpg": 2, "selfie-many-people.jpg": 4, "img11_reflection.jpg": 1}


def holds(face: Face, centre: tuple[int, int]) -> bool:
    x, y, w, h = face.box
    return x <= centre[0] <= x + w and y <= centre[1] <= y + h


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two photos on one grey canvas, top-aligned."""
    height = max(left.shape[0], right.shape[0])
    canvas = np.full((height, left.shape[1] + right.shape[1], 3), 128, np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] :] = right
    return canvas


@pytest.mark.parametrize(
    ("left_name", "right_name", "left_scale", "right_scale"),
    [
        ("img1.jpg", "img3.jpg", 1.0, 0.5),  # G01 beside G02, the second at half size
        ("img12.jpg", "img2.jpg", 0.4, 1.3),  # G02 small beside G01 enlarged
    ],
)
def test_composed_people_get_one_face_each(
    faces_dir: Path, left_name: str, right_name: str, left_scale: float, right_scale: float
) -> None:
    embedder = Embedder()
    left = cv2.imread(str(faces_dir / left_name))
    right = cv2.imread(str(faces_dir / right_name))
    left = cv2.resize(left, None, fx=left_scale, fy=left_scale, interpolation=cv2.INTER_AREA)
    right = cv2.resize(right, None, fx=right_scale, fy=right_scale, interpolation=cv2.INTER_AREA)
    alone = [largest_face(embedder.embed(_png(photo))).embedding for photo in (left, right)]
    ok, composed = cv2.imencode(".jpg", side_by_side(left, right))
    assert ok

    faces = sorted(embedder.embed(composed.tobytes(), name="composed"), key=lambda f: f.box[0])

    assert len(faces) == 2, [f.box for f in faces]
    split = left.shape[1]
    for face, (low, high) in zip(faces, [(0, split), (split, split + right.shape[1])], strict=True):
        x, _, w, _ = face.box
        assert low <= x and x + w <= high, (face.box, split)
    limit = threshold("Dlib", "cosine")
    for i, face in enumerate(faces):
        own, other = (find_cosine_distance(face.embedding, e) for e in (alone[i], alone[1 - i]))
        assert own < limit < other, (i, own, other)


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("name", sorted(MULTI_FACE))
def test_multi_face_photos_give_the_documented_counts_and_no_false_face(
    faces_dir: Path, name: str
) -> None:
    faces = Embedder(detector=DEFAULT_DETECTOR).embed(faces_dir / name)
    centres = MULTI_FACE[name]
    false = [f.box for f in faces if not any(holds(f, c) for c in centres)]
    assert not false, f"boxes holding no face: {false}"
    found = sum(any(holds(f, c) for f in faces) for c in centres)
    assert found == len(faces) == FOUND_BY_DEFAULT[name]


def test_boxes_are_in_original_coordinates(faces_dir: Path) -> None:
    """A photo enlarged past max_side gets the same face, boxes scaled with the photo."""
    photo = cv2.imread(str(faces_dir / "img1.jpg"))
    # Both detected at the photo's own size: the enlarged one is brought back down to it.
    embedder = Embedder(max_side=max(photo.shape[:2]))
    (small,) = embedder.embed(_png(photo))
    enlarged = cv2.resize(photo, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    ok, jpeg = cv2.imencode(".jpg", enlarged, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    (large,) = embedder.embed(jpeg.tobytes())
    np.testing.assert_allclose(np.array(large.box), 3 * np.array(small.box), rtol=0.02, atol=6)
    assert find_cosine_distance(small.embedding, large.embedding) < 0.02
