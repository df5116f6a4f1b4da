"""Cost of the largest images the caps allow: time per embed and the RSS they leave.

Builds images at the limits (6000x6000 PNG, JPEG and WebP with a face in them, a
flat PNG just under the pixel cap, a noise JPEG just under the byte cap, and bombs
over the caps that must be refused), then embeds a stream of them in a fresh
process and prints the wall time and the CPU time of each (the process's, all its
threads: what the embedding costs whatever else shares the cores) and that
process's RSS before, at peak and after. Verdicts: no image under the caps takes
more than --max-seconds, in wall time and in CPU time (one each: wall time follows
the load of other jobs on the machine, CPU time hardly), and the RSS after the
stream is within --max-rss-mb of the baseline. Exits 1 on a miss.

    python benchmarks/bench_images.py [--faces DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from cipherface.embedding import (
    DEFAULT_DETECTOR,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    Embedder,
)
from cipherface.exceptions import EmbeddingError, ImageDecodeError

DEFAULT_FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"


def rss_mb() -> float:
    """This process's resident set size now."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mb() -> float:
    """This process's highest resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, data = cv2.imencode(ext, image, params or [])
    assert ok, ext
    return data.tobytes()


def build(faces: Path, folder: Path) -> dict[str, bool]:
    """Write the test images; the value says whether the caps admit the image."""
    portrait = cv2.imread(str(faces / "img1.jpg"))
    side = 6000  # 36 Mpx: under MAX_IMAGE_PIXELS (40 Mpx)
    big = cv2.resize(portrait, (side, side), interpolation=cv2.INTER_CUBIC)
    flat = np.full((side, side, 3), 255, np.uint8)
    flat[200 : 200 + portrait.shape[0], 200 : 200 + portrait.shape[1]] = portrait
    bomb_side = int(MAX_IMAGE_PIXELS**0.5)  # just under the cap, a few hundred KB
    noise_rng = np.random.default_rng(0)
    # A photo-like PNG at 6000x6000 is over the byte cap: the largest side that fits.
    png_side = side
    while len(png := encode(cv2.resize(big, (png_side, png_side)), ".png")) > MAX_IMAGE_BYTES:
        png_side = int(png_side * 0.9)
    images = {
        f"portrait-{png_side}.png": (png, True),
        "portrait-6000-over-bytes.png": (encode(big, ".png"), False),
        "portrait-6000.jpg": (encode(big, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]), True),
        "portrait-6000.webp": (encode(big, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]), True),
        "flat-6000.png": (encode(flat, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 9]), True),
        f"bomb-{bomb_side}.png": (
            encode(
                np.zeros((bomb_side, bomb_side, 3), np.uint8),
                ".png",
                [cv2.IMWRITE_PNG_COMPRESSION, 9],
            ),
            True,
        ),
        "bomb-over-cap.png": (
            encode(
                np.zeros((MAX_IMAGE_PIXELS // 4000 + 1, 4000), np.uint8),
                ".png",
                [cv2.IMWRITE_PNG_COMPRESSION, 9],
            ),
            False,
        ),
    }
    # Noise does not compress: the largest JPEG under the byte cap, at a size under the
    # pixel cap, with a portrait pasted in so the model runs too.
    noisy = noise_rng.integers(0, 256, (4200, 4200, 3), dtype=np.uint8)
    noisy[300 : 300 + portrait.shape[0], 300 : 300 + portrait.shape[1]] = portrait
    quality = 95
    data = encode(noisy, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality])
    while len(data) > MAX_IMAGE_BYTES:
        quality -= 5
        data = encode(noisy, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality])
    images["noise-4200.jpg"] = (data, True)
    for name, (data, _) in images.items():
        (folder / name).write_bytes(data)
    return {name: admitted for name, (_, admitted) in images.items()}


def worker(
    folder: Path, names: list[str], rounds: int, warmup: Path, detector: str, max_side: int
) -> None:
    """In a fresh process: baseline after one small photo, then the stream."""
    embedder = Embedder(detector=detector, max_side=max_side)
    embedder.embed(warmup)
    gc.collect()
    baseline = rss_mb()
    for _ in range(rounds):
        for name in names:
            data = (folder / name).read_bytes()
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                outcome = f"{len(embedder.embed(data, name=name))} face(s)"
            except ImageDecodeError as exc:
                outcome = f"refused: {exc}"
            except EmbeddingError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            record = {"name": name, "seconds": elapsed, "cpu": cpu, "outcome": outcome}
            print(json.dumps(record | {"rss": rss_mb()}), flush=True)
    gc.collect()
    print(json.dumps({"baseline": baseline, "after": rss_mb(), "peak": peak_mb()}), flush=True)


def main() -> int:
    """Build the images, run the worker, print figures and verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--faces", type=Path, default=Path(os.environ.get("CIPHERFACE_FACES_DIR") or DEFAULT_FACES)
    )
    parser.add_argument("--rounds", type=int, default=3, help="passes over the image set")
    parser.add_argument("--max-seconds", type=float, default=2.0)
    parser.add_argument("--max-rss-mb", type=float, default=300.0)
    parser.add_argument("--detector", default=DEFAULT_DETECTOR)
    parser.add_argument("--max-side", type=int, default=MAX_IMAGE_SIDE)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = sorted(p.name for p in args.worker.iterdir()) if args.worker else []
    if args.worker:
        worker(
            args.worker, names, args.rounds, args.faces / "img2.jpg", args.detector, args.max_side
        )
        return 0

    with tempfile.TemporaryDirectory(prefix="cf-bench-images-") as tmp:
        folder = Path(tmp)
        admitted = build(args.faces, folder)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                tmp,
                "--faces",
                str(args.faces),
                "--rounds",
                str(args.rounds),
                "--detector",
                args.detector,
                "--max-side",
                str(args.max_side),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    if child.returncode:
        print(child.stderr, file=sys.stderr)
        return 2
    records = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    memory = records.pop()
    print(
        f"# detector {args.detector}, Dlib, longest side <= {args.max_side} px; "
        f"caps {MAX_IMAGE_BYTES // 2**20} MiB, {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx; "
        f"{args.rounds} rounds in a fresh process"
    )
    print(
        f"{'image':28} {'KB':>7} {'median_s':>8} {'max_s':>6} {'median_cpu_s':>12} "
        f"{'max_cpu_s':>9}  outcome"
    )
    slow: dict[str, list[str]] = {"seconds": [], "cpu": []}
    for name in sorted(admitted):
        mine = [r for r in records if r["name"] == name]
        times = {key: [r[key] for r in mine] for key in slow}
        outcome = mine[0]["outcome"]
        print(
            f"{name:28} {sizes[name] / 1e3:7.0f} {statistics.median(times['seconds']):8.2f} "
            f"{max(times['seconds']):6.2f} {statistics.median(times['cpu']):12.2f} "
            f"{max(times['cpu']):9.2f}  {outcome}"
        )
        for key, missed in slow.items():
            if admitted[name] and max(times[key]) > args.max_seconds:
                missed.append(name)
            if admitted[name] == outcome.startswith("refused:"):
                missed.append(f"{name} (wrong outcome)")
    delta = memory["after"] - memory["baseline"]
    print(
        f"RSS: baseline {memory['baseline']:.0f} MB, peak {memory['peak']:.0f} MB, "
        f"after {memory['after']:.0f} MB (delta {delta:+.0f} MB)"
    )
    time_ok, rss_ok = not slow["seconds"] and not slow["cpu"], delta <= args.max_rss_mb
    for key, label in (("seconds", "wall time"), ("cpu", "CPU time")):
        print(
            f"verdict {label} (<= {args.max_seconds:.1f} s each): "
            f"{'FAIL ' + ', '.join(slow[key]) if slow[key] else 'PASS'}"
        )
    print(f"verdict RSS (delta <= {args.max_rss_mb:.0f} MB): {'PASS' if rss_ok else 'FAIL'}")
    return 0 if time_ok and rss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
