"""`qrealign-gguf` command line: presentation only. Each command (one module each) parses its options, calls the
library (qrealign_gguf.api), shows progress and tables, and maps errors to exit codes (common.run_guarded).
Nothing below this package imports it."""
from __future__ import annotations

import sys

import typer

from . import convert, eval, inspect, package, probe, run

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert fine-tuned Hugging Face models to GGUF, realigning safety while quantizing.")
app.command("convert")(convert.convert)
app.command("probe")(probe.probe)
app.command("inspect")(inspect.inspect)
app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(run.run)
app.command("package")(package.package)
app.command("eval")(eval.eval_command)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
