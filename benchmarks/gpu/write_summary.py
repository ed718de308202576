"""The GPU check's summary.json: every stage's status, seconds and limit (from the script's stages.jsonl) with the
figures its Python entry point left (WORK/<stage>.json), and the op benchmark's per-size results merged into
op_benchmark.json. Exit status 0 when no stage failed or timed out.

    python benchmarks/gpu/write_summary.py WORK OUT --total-seconds S          # run by benchmarks/gpu_check.sh
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MAX_FILES = 8  # the device tool returns no more files from $OUT
OK_STATUSES = ("passed", "not available", "skipped")


def merge_op_benchmark(work: Path, out: Path) -> list | None:
    """benchmarks/contrast_loss.py wrote one JSON per size; one file with all rows (flat: "M = N", "op ms",
    "op MiB", "eager ms", "<method> error", ...), which are also the stage's figures."""
    parts = sorted((work / "op_benchmark").glob("*.json"), key=lambda p: int(p.stem))
    if not parts:
        return None
    merged = json.loads(parts[0].read_text())
    merged["rows"] = [row for part in parts for row in json.loads(part.read_text()).get("rows", [])]
    merged.pop("table", None)
    (out / "op_benchmark.json").write_text(json.dumps(merged, indent=2) + "\n")
    return merged["rows"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--total-seconds", type=float, required=True)
    args = parser.parse_args(argv)
    stages = {}
    stages_file = args.work / "stages.jsonl"
    for line in (stages_file.read_text().splitlines() if stages_file.exists() else []):
        entry = json.loads(line)
        stages[entry.pop("name")] = entry
    for name, entry in stages.items():
        figures = args.work / f"{name}.json"
        if figures.is_file():
            entry["figures"] = json.loads(figures.read_text())
    op_benchmark = merge_op_benchmark(args.work, args.out)
    if op_benchmark is not None:
        stages.setdefault("op_benchmark", {"status": "passed"})["figures"] = op_benchmark
        sizes = [name for name in stages if name.startswith("op_benchmark M=N=")]
        # The eager baseline may run out of memory at large sizes (recorded); the op must not fail.
        op_errors = {str(row.get("M = N")): row["op error"] for row in op_benchmark if "op error" in row}
        ok = all(stages[s]["status"] in OK_STATUSES for s in sizes) and not op_errors
        stages["op_benchmark"]["status"] = "passed" if ok else "failed"
        if op_errors:
            stages["op_benchmark"]["op_errors"] = op_errors
    failed = sorted(name for name, entry in stages.items() if entry["status"] not in OK_STATUSES)
    files = sorted({p.name for p in args.out.iterdir()} | {"summary.json"})
    summary = {"passed": not failed and bool(stages), "failed_stages": failed, "total_seconds": args.total_seconds,
               "stages": stages, "files": files}
    if len(files) > MAX_FILES:
        summary["passed"] = False
        summary["failed_stages"].append(f"more than {MAX_FILES} files under OUT: {files}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    for name, entry in stages.items():
        print(f"{name:40s} {entry['status']:14s} {entry.get('seconds', '')} s")
    print(f"summary: {'all stages passed' if summary['passed'] else 'FAILED: ' + ', '.join(failed)}; "
          f"{args.total_seconds:.0f} s; {args.out / 'summary.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
