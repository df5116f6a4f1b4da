"""Per-face answers through the agents: one event per probe, one result per face.

Enrolls G01, G02 and G03 (their first two photos) on the in-process broker, then
probes 1:N photos composed from labelled portraits (side by side, at different
sizes; G05 is not enrolled) and the shared multi-face photos, and prints each
face of each event: where it is, what the detector thought of it, whom on-prem
named and whether it is verified. PASS when every enrolled person of a composed
photo is named and verified, the stranger is not, and no face is reported where
there is none (the face counts of the README's detector table).

    python benchmarks/bench_faces.py [--faces DIR] [--upsample N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import cv2
import numpy as np

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface.client import Client
from cipherface.config import Settings
from cipherface.embedding import install_weights
from cipherface.photos import default_faces_dir, identity_groups
from cipherface.signing import TrustStore
from cipherface.transport import MemoryBroker, open_transport

#: (name, [(group or file, scale)]): composed left to right; a group means its third photo.
COMPOSED = [
    ("G01+G02", [("G01", 1.0), ("G02", 0.6)]),
    ("G03+G05+G02", [("G03", 0.5), ("G05", 1.0), ("G02", 0.8)]),
    ("G02+G01", [("G02", 0.4), ("G01", 1.3)]),
]
#: Shared multi-face photos and the faces the default detector finds (README table).
SHARED = {"couple.jpg": 2, "img11_reflection.jpg": 1, "selfie-many-people.jpg": 4}
ENROLLED = ("G01", "G02", "G03")


def compose(folder: Path, groups: dict[str, list[str]], parts: list[tuple[str, float]]) -> bytes:
    """The parts side by side on a grey canvas, top-aligned, as JPEG bytes."""
    images = [
        cv2.resize(cv2.imread(str(folder / groups[g][2])), None, fx=s, fy=s) for g, s in parts
    ]
    canvas = np.full(
        (max(i.shape[0] for i in images), sum(i.shape[1] for i in images), 3), 128, np.uint8
    )
    x = 0
    for image in images:
        canvas[: image.shape[0], x : x + image.shape[1]] = image
        x += image.shape[1]
    ok, data = cv2.imencode(".jpg", canvas)
    assert ok
    return data.tobytes()


async def run(folder: Path, upsample: int | None) -> bool:
    groups = identity_groups(folder)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), detect_upsample=upsample)
        generate_keys(settings)
        root = Path(tmp) / "enroll"
        for group in ENROLLED:
            (root / group).mkdir(parents=True)
            for name in groups[group][:2]:
                (root / group / name).symlink_to(folder / name)
        broker = MemoryBroker()
        async with (
            open_transport(settings, broker) as a,
            open_transport(settings, broker) as b,
            open_transport(settings, broker) as c,
        ):
            onprem, cloud = OnPremAgent(settings, a), CloudAgent(settings, b)
            TrustStore(settings.trust_store_path).add(cloud.replica, cloud.signer.verify_key)
            await onprem.start()
            await onprem.enroll(root, progress=False)
            await cloud.start()
            await asyncio.wait_for(cloud.ready.wait(), 300)
            client = Client(c, onprem.signer.verify_key)
            probes = [(n, compose(folder, groups, p), p) for n, p in COMPOSED]
            probes += [(n, (folder / n).read_bytes(), None) for n in SHARED]
            print(f"enrolled {', '.join(ENROLLED)}; 1:N probes; faces left to right")
            print(
                f"{'probe':<24}{'face':>5}  {'box (x,y,w,h)':<22}{'conf':>6}  "
                f"{'subject':<8}{'verified':<9}{'distance':>9}  expected"
            )
            passed = True
            for name, image, parts in probes:
                event = await client.verify(image, timeout=300)
                faces = sorted(event.faces, key=lambda f: f.box[0] if f.box else 0)
                expected = (
                    [g if g in ENROLLED else "stranger" for g, _ in parts]
                    if parts
                    else ["-"] * SHARED[name]
                )
                passed &= len(faces) == len(expected) and event.error is None
                for i, face in enumerate(faces):
                    want = expected[i] if i < len(expected) else "no face"
                    if parts:
                        passed &= face.verified == (want != "stranger")
                        passed &= not face.verified or face.subject == want
                    print(
                        f"{name:<24}{i:>5}  {face.box!s:<22}{face.confidence:>6.2f}  "
                        f"{face.subject or '-':<8}{face.verified!s:<9}"
                        f"{face.distance:>9.4f}  {want}"
                    )
                if event.error:
                    print(f"{name:<24} error: {event.error}")
            await cloud.stop()
            await onprem.stop()
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=default_faces_dir(), help="photo folder")
    parser.add_argument(
        "--upsample", type=int, help="dlib's doublings before its scan (CIPHERFACE_DETECT_UPSAMPLE)"
    )
    args = parser.parse_args()
    install_weights()
    passed = asyncio.run(run(args.faces, args.upsample))
    print(f"verdict per-face answers: {'PASS' if passed else 'FAIL'}")


if __name__ == "__main__":
    main()
