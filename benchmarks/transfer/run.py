"""The transfer-learning study, one command: results.json, PNG plots and REPORT.md.

    python -m benchmarks.transfer.run                 # the full study (3 seeds; REPORT.md gives its time)
    python -m benchmarks.transfer.run --smoke         # every experiment at toy size (the test suite's)
    python -m benchmarks.transfer.run --seeds 5 --out $TMPDIR/study
    python -m benchmarks.transfer.run --report-only   # redraw REPORT.md and the plots from results.json

Results go to benchmarks/results/transfer/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "transfer"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the reduced size the test suite runs")
    ap.add_argument("--seeds", type=int, help="seeds per configuration (default: 3, smoke: 1)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default: 60)")
    ap.add_argument("--base", help="base model directory (default: the embedded base)")
    ap.add_argument("--threads", type=int, help="torch threads per run (default: 1)")
    ap.add_argument("--jobs", type=int, help="runs at once, one process each (default: 1)")
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})"
    )
    ap.add_argument("--work-dir", type=Path, help="keep datasets, random-init models and adapters here")
    ap.add_argument(
        "--report-only", action="store_true", help="regenerate REPORT.md and plots from results.json"
    )
    args = ap.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from adapterhub_lite.errors import AdapterHubError
    from benchmarks.transfer import StudyConfig, run_study, summarize, write_report, write_results

    hf_logging.disable_progress_bar()  # one bar for the study, not one per model load
    try:
        if args.report_only:
            path = args.out / "results.json"
            if not path.is_file():
                raise AdapterHubError(
                    f"no results at {path}", hint="run the study first (without --report-only)"
                )
            results = json.loads(path.read_text(encoding="utf-8"))
            results["summary"] = summarize(results)
            write_results(path, results)
        else:
            overrides = {
                k: v
                for k, v in (
                    ("seeds", args.seeds),
                    ("steps", args.steps),
                    ("base", args.base),
                    ("threads", args.threads),
                    ("jobs", args.jobs),
                )
                if v is not None
            }
            config = StudyConfig.smoke(**overrides) if args.smoke else StudyConfig.full(**overrides)
            results = run_study(config, args.out, work_dir=args.work_dir)
        report = write_report(results, args.out)
    except AdapterHubError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / 'results.json'} and {report}")
    for name, target in results["summary"]["targets"].items():
        verdict = {True: "met", False: "missed"}.get(target.get("met"), "undecided")
        print(f"target {name}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
