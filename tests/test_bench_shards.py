"""benchmarks/bench_shards.py --quick runs and prints tables that parse (figures, not timing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: shards, templates, blocks, 4 times, 2 MB figures, 2 GB figures, rank1, 3 load averages.
_COLUMNS = 15


def test_quick_run_prints_parsable_tables(tmp_path: Path) -> None:
    plot = tmp_path / "shards.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_shards.py"), "--quick", "--plot", plot],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["shards", "templates"])
    rows = []
    for line in lines[header + 1 :]:
        fields = line.split()
        if not fields or not fields[0].isdigit():
            break
        if fields[1].isdigit():
            rows.append(fields)
    assert all(len(row) == _COLUMNS for row in rows), rows
    assert {(int(r[0]), int(r[1])) for r in rows} == {
        (s, n) for s in (1, 2, 4) for n in (8192, 16384, 32768)
    }
    for row in rows:
        times = [float(x) for x in row[3:7]]
        assert times[3] == max(times) and all(t > 0 for t in times)  # total = gather + rank
        assert [float(x) for x in row[7:11]] and row[11] == "yes"
        assert [float(x) for x in row[12:]]
    projection = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in projection] == [1, 10, 50, 100]
    for line in projection:
        *figures, fits = line.strip("|").split("|")
        assert [float(cell.replace(",", "")) for cell in figures] and fits.strip() in {"yes", "no"}
    assert any(line.startswith("| HERS") for line in lines)
    assert any(line.startswith("verdict >= 5M x 128-d held:") for line in lines)
    assert f"plot: {plot}" in lines and plot.stat().st_size > 0
