"""Which face detector to use, by measurement on the shared photos.

For each DeepFace detector that works offline here, prints: faces found vs expected on
the portraits (1 each) and on the three multi-face photos (counts and face centres
annotated by hand below), false faces (a box that holds no annotated face centre, or a
second face in a portrait), Dlib+cosine accuracy on the 520 labelled pairs (largest
face; a photo without a face makes its pairs wrong), and the median time per photo.
Both before ("raw") and after the detector's `FACE_FILTERS` entry. Detectors that
cannot run offline here are listed with the reason.

    python benchmarks/bench_detectors.py [--faces DIR] [--detectors opencv,dlib,dlib/0,...]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from deepface.modules.verification import find_cosine_distance

from cipherface.embedding import (
    FACE_FILTERS,
    MAX_IMAGE_SIDE,
    Embedder,
    Face,
    FaceFilter,
    image_size,
    largest_face,
    threshold,
)
from cipherface.exceptions import NoFaceError

DEFAULT_FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"

#: Face centres (x, y in original pixels) counted by eye in the unlabelled photos.
#: selfie-many-people.jpg has 7 people; two at the left edge are partly cut off.
#: img11_reflection.jpg shows one person (the "reflection" is the mirrored photo).
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

#: DeepFace detectors whose weights cannot be had offline here, and why.
OFFLINE_BLOCKERS = {
    "retinaface": "needs TensorFlow and downloads retinaface.h5",
    "mtcnn": "mtcnn ships its weights but runs them on TensorFlow",
    "fastmtcnn": "needs PyTorch (facenet-pytorch)",
    "ssd": "downloads its Caffe model",
    "yunet": "downloads face_detection_yunet_2023mar.onnx (not in the OpenCV wheel)",
    "centerface": "downloads centerface.onnx",
    "yolov8": "needs ultralytics and downloads its weights",
}


#: Every raw detection, written to benchmarks/out/detections.json for tuning the filters.
DETECTIONS: dict[str, dict[str, list[tuple[tuple[int, int, int, int], float]]]] = {}


@dataclass(slots=True)
class Row:
    """What one detector did over all photos."""

    detector: str
    portraits: int = 0
    portraits_one: dict[str, int] = field(default_factory=dict)  # raw / filtered
    extra: dict[str, int] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)
    multi: dict[str, list[str]] = field(default_factory=dict)
    accuracy: float = 0.0
    seconds: list[float] = field(default_factory=list)
    #: CPU seconds of this process (all threads): what a shared machine does not inflate.
    cpu: list[float] = field(default_factory=list)


def holds(face: Face, centre: tuple[int, int]) -> bool:
    """Whether the face box contains an annotated face centre."""
    x, y, w, h = face.box
    return x <= centre[0] <= x + w and y <= centre[1] <= y + h


def detect(embedder: Embedder, path: Path, row: Row) -> list[Face]:
    """Every detection (no filter), timed."""
    started, cpu = time.perf_counter(), time.process_time()
    try:
        faces = embedder.embed(path)
    except NoFaceError:
        faces = []
    row.seconds.append(time.perf_counter() - started)
    row.cpu.append(time.process_time() - cpu)
    return faces


def measure(spec: str, faces_dir: Path, portraits: list[str], pairs: list[tuple]) -> Row:
    """Run one detector (``name[/upsample][@max_side]``) over all the photos."""
    named, _, side = spec.partition("@")
    detector, _, upsample = named.partition("/")
    embedder = Embedder(
        "Dlib",
        detector,
        max_side=int(side or MAX_IMAGE_SIDE),
        face_filter=FaceFilter(min_side=0, min_fraction=0),
        upsample=int(upsample) if upsample else None,
    )
    chosen = FACE_FILTERS.get(detector, FaceFilter())
    row = Row(detector=spec, portraits=len(portraits))
    embedder.embed(faces_dir / portraits[0])  # model and detector loads are not timed
    kept: dict[str, list[Face]] = {}
    for name in portraits:
        raw = detect(embedder, faces_dir / name, row)
        DETECTIONS.setdefault(spec, {})[name] = [(f.box, f.confidence) for f in raw]
        # The photos here are upright (no EXIF rotation), so header size = image size.
        width, height = image_size((faces_dir / name).read_bytes())
        kept[name] = [f for f in raw if chosen.admits(f, width, height)]
        for key, found in (("raw", raw), ("filtered", kept[name])):
            row.portraits_one[key] = row.portraits_one.get(key, 0) + (len(found) == 1)
            row.extra[key] = row.extra.get(key, 0) + max(0, len(found) - 1)
            row.missed[key] = row.missed.get(key, 0) + (not found)
    for name, centres in MULTI_FACE.items():
        raw = detect(embedder, faces_dir / name, row)
        DETECTIONS.setdefault(spec, {})[name] = [(f.box, f.confidence) for f in raw]
        width, height = image_size((faces_dir / name).read_bytes())
        filtered = [f for f in raw if chosen.admits(f, width, height)]
        cells = []
        for found in (raw, filtered):
            true = sum(any(holds(f, c) for f in found) for c in centres)
            false = sum(not any(holds(f, c) for c in centres) for f in found)
            cells.append(f"{true}/{len(centres)}+{false}")
            row.extra["raw" if found is raw else "filtered"] += false
        row.multi[name] = cells
    limit = threshold("Dlib", "cosine")
    right = 0
    for a, b, same in pairs:
        if kept[a] and kept[b]:
            distance = find_cosine_distance(
                largest_face(kept[a]).embedding, largest_face(kept[b]).embedding
            )
            right += (distance <= limit) == same
    row.accuracy = right / len(pairs)
    return row


def available(detectors: list[str]) -> list[str]:
    """The detectors whose libraries import here."""
    needs = {"dlib": "dlib", "mediapipe": "mediapipe"}
    usable = []
    for name in detectors:
        module = needs.get(name.partition("@")[0].partition("/")[0])
        if module and importlib.util.find_spec(module) is None:
            print(f"# {name}: not installed here (pip install {module})", file=sys.stderr)
            continue
        usable.append(name)
    return usable


def main() -> None:
    """Measure, print the table, and list the detectors that cannot run offline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--faces", type=Path, default=Path(os.environ.get("CIPHERFACE_FACES_DIR") or DEFAULT_FACES)
    )
    parser.add_argument(
        "--detectors",
        default="opencv@1920,opencv,dlib@1920,dlib,mediapipe",
        help="comma-separated DeepFace detectors, each name[/upsample][@max_side] "
        "(upsample: dlib's doublings before the scan)",
    )
    args = parser.parse_args()
    with (args.faces / "pairs.csv").open(newline="") as handle:
        pairs = [
            (r["image_a"], r["image_b"], r["same_person"] == "yes") for r in csv.DictReader(handle)
        ]
    with (args.faces / "identities.csv").open(newline="") as handle:
        names = {r["file"] for r in csv.DictReader(handle)}
    portraits = sorted(names | {n for a, b, _ in pairs for n in (a, b)})
    rows = [measure(d, args.faces, portraits, pairs) for d in available(args.detectors.split(","))]

    print(
        f"Dlib embeddings, detection at <= {MAX_IMAGE_SIDE} px (or @side); "
        "raw -> after FACE_FILTERS."
    )
    print(f"Portraits: {len(portraits)} photos, 1 face each. Multi-face: found/expected+false.")
    print()
    print(
        "| detector | portraits with 1 face | portraits with none | false faces (all photos) "
        "| couple.jpg | selfie-many-people.jpg | img11_reflection.jpg "
        "| accuracy, 520 pairs | s/photo | CPU s/photo |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        multi = " | ".join(" -> ".join(r.multi[n]) for n in MULTI_FACE)
        print(
            f"| {r.detector} | {r.portraits_one['raw']} -> {r.portraits_one['filtered']} "
            f"| {r.missed['raw']} -> {r.missed['filtered']} "
            f"| {r.extra['raw']} -> {r.extra['filtered']} | {multi} "
            f"| {100 * r.accuracy:.1f}% | {statistics.median(r.seconds):.2f} "
            f"| {statistics.median(r.cpu):.2f} |"
        )
    print()
    for name, reason in OFFLINE_BLOCKERS.items():
        print(f"- {name}: not offline here ({reason})")
    out = Path(__file__).parent / "out" / "detections.json"
    out.write_text(json.dumps(DETECTIONS, indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
