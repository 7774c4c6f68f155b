"""Slim the newest checkpoint of a run.

    python -m sparsejax.slim RUN_DIR [--output OUT] [--debug]

Rebuilds the run's model from RUN_DIR/config.json, restores its newest checkpoint, removes the
pruned units (:func:`sparsejax.slim.slim_model`) and writes to OUT (default RUN_DIR/slim) an
Orbax checkpoint of the slim model, ``slim_config.json`` (what
:func:`sparsejax.slim.store.load_slim` needs to rebuild it) and ``slim_report.json`` (params and
FLOPs before and after); prints the same numbers as a table. A run that is not one, a damaged
checkpoint or a full disk is reported as one ``error:`` line (exit status 1); ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsejax.errors import DEBUG_ENVIRONMENT_VARIABLE, REPORTABLE, report_error
from sparsejax.slim.result import SlimReport
from sparsejax.slim.runs import restore_run
from sparsejax.slim.store import save_slim
from sparsejax.slim.surgery import slim_model

DEFAULT_OUTPUT = "slim"


def format_report(report: SlimReport) -> str:
    """The report as a markdown table: params, stored params and FLOPs before and after."""
    rows = [
        ("params", report.params_before, report.params_after),
        ("stored params", report.stored_params_before, report.stored_params_after),
        ("FLOPs (MACs)", report.flops_before, report.flops_after),
    ]
    lines = ["| | before | after | before / after |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |" for name, a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsejax.slim", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="working directory of a training run")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"where to write the slim model (default RUN_DIR/{DEFAULT_OUTPUT})")
    parser.add_argument(
        "--debug", action="store_true",
        help=f"show the traceback of an error (also: {DEBUG_ENVIRONMENT_VARIABLE}=1)",
    )
    args = parser.parse_args(argv)
    output = args.output or args.run_dir / DEFAULT_OUTPUT
    try:
        model, spec, step = restore_run(args.run_dir)
        result = slim_model(model)
        save_slim(output, spec, result)
    except REPORTABLE as error:
        return report_error(error, debug=args.debug, output="--output")
    print(f"{spec.model} at step {step} -> {output}")
    print(format_report(result.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
