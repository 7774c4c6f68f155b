"""Slim the newest checkpoint of a run.

    python -m sparsejax.slim RUN_DIR [--output OUT] [--round_to K] [--debug]

Rebuilds the run's model from RUN_DIR/config.json, restores its newest checkpoint, removes the
pruned units from its trace (:mod:`sparsejax.slim.traced`) and writes to OUT (default
RUN_DIR/slim) the slim network, ``slim_function.npz``, which :func:`sparsejax.load_slim_function`
loads without the model's class, and ``slim_report.json`` (widths, params and FLOPs before and
after, ``round_to``, ``max_logit_difference`` to the gated model on the run's first test
examples); prints the same numbers as a table. ``--round_to K`` keeps every slimmed width at a
multiple of K (or the full width). A run that is not one, a damaged checkpoint or a full disk is
reported as one ``error:`` line (exit status 1); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsejax.data.sources import BatchSource
from sparsejax.errors import (
    DEBUG_ENVIRONMENT_VARIABLE,
    REPORTABLE,
    ConfigError,
    report_error,
)
from sparsejax.slim.runs import restore_model, run_config
from sparsejax.slim.store import save_slim_function
from sparsejax.slim.traced import CHECK_EXAMPLES, check_images, slim_traced_model
from sparsejax.structure.slim_trace import SlimReport
from sparsejax.structure.traced_model import TracedModel
from sparsejax.train.loop import load_data

DEFAULT_OUTPUT = "slim"


def parse_round_to(text: str) -> int:
    """The value of ``--round_to``: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"--round_to must be a positive integer (the multiple slim widths are rounded up to, "
            f"e.g. 8), got {text!r}"
        )
    return value


def slim_and_save(
    model: TracedModel, data: BatchSource, output: Path, round_to: int
) -> SlimReport:
    """Slim ``model``, checked on test examples of ``data``, write it under ``output`` and
    return its report."""
    slim = slim_traced_model(model, check_images(data), round_to=round_to)
    save_slim_function(output, slim)
    return slim.report


def format_report(report: SlimReport) -> str:
    """The report as a markdown table: params, stored params and FLOPs before and after."""
    rows = [
        ("params", report.params_before, report.params_after),
        ("stored params", report.stored_params_before, report.stored_params_after),
        ("FLOPs (MACs)", report.flops_before, report.flops_after),
    ]
    lines = ["| | before | after | before / after |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {a:,.0f} | {b:,.0f} | {f'{a / b:.2f}x' if b else '-'} |"
        for name, a, b in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsejax.slim", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="working directory of a training run")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"where to write the slim model (default RUN_DIR/{DEFAULT_OUTPUT})")
    parser.add_argument(
        "--round_to", default="1", metavar="K",
        help="keep every slimmed width at a multiple of K, or the full width (default 1)",
    )
    parser.add_argument(
        "--debug", action="store_true",
        help=f"show the traceback of an error (also: {DEBUG_ENVIRONMENT_VARIABLE}=1)",
    )
    args = parser.parse_args(argv)
    output = args.output or args.run_dir / DEFAULT_OUTPUT
    try:
        round_to = parse_round_to(args.round_to)
        config = run_config(args.run_dir)
        data = load_data(config)
        model, spec, step = restore_model(args.run_dir, config, data)
        report = slim_and_save(model, data, output, round_to)
    except REPORTABLE as error:
        return report_error(error, debug=args.debug, output="--output")
    print(f"{spec.model} at step {step} -> {output}")
    print(format_report(report))
    widths = "-".join(f"{g.width}/{g.size}" for g in report.groups)
    print(f"widths per traced group (kept/size): {widths}")
    for path, (kept, size) in report.rows.items():
        print(f"rows of {path} kept: {kept}/{size}")
    examples = min(CHECK_EXAMPLES, data.num_test)
    print(f"max logit difference to the gated model on {examples} test examples: "
          f"{report.max_logit_difference:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
