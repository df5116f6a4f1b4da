"""Install time and size: ``pip install .`` into a fresh venv, as a user would.

Prints the wall time of the install (pip's cache as it is: warm after
``make install``), the size of the venv it produced and its largest packages,
the figures the README quotes.

Run:  python benchmarks/bench_install.py [--extras bench]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent


def _size(folder: Path) -> int:
    """Bytes of regular files under ``folder`` (links not followed)."""
    return sum(
        path.stat().st_size
        for path in folder.rglob("*")
        if path.is_file() and not path.is_symlink()
    )


def main(argv: list[str] | None = None) -> int:
    """Install into a temporary venv and print time and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="", help="e.g. bench (default: none)")
    args = parser.parse_args(argv)
    target = f"{_ROOT}[{args.extras}]" if args.extras else str(_ROOT)
    with tempfile.TemporaryDirectory() as name:
        venv = Path(name) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        start = time.perf_counter()
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", target], check=True, env=env
        )
        elapsed = time.perf_counter() - start
        size = _size(venv)
        [site] = venv.glob("lib/python*/site-packages")
        largest = sorted(((_size(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True)
    print(
        f"install (pip install {'.[' + args.extras + ']' if args.extras else '.'}, Python "
        f"{sys.version_info.major}.{sys.version_info.minor}, pip cache as found): "
        f"{elapsed:.0f} s, {size / 1e6:.0f} MB"
    )
    print("largest packages: " + ", ".join(f"{n} {b / 1e6:.0f} MB" for b, n in largest[:8]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
