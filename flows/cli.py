"""The `fiqa` command line: one sub-command per flow, imported only when it is run (errors: flows.command)."""

from __future__ import annotations

import argparse
import importlib
import sys

from flows.command import prefect_defaults, run_command

# name -> (module, one-line help). Modules are imported lazily so `fiqa --help`,
# `fiqa sql` and `fiqa stats` never import Prefect or torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flows.demo", "build the demo dataset from package-shipped faces and run the whole pipeline"),
    "ingest": ("flows.ingest", "read a dataset into the samples table"),
    "label": ("flows.label", "align faces and label blur, pose and attributes"),
    "relabel": ("flows.relabel", "re-run chosen labellers on a SQL-selected subset, as a new run"),
    "anchors": ("flows.anchors", "embed faces and compute CR-FIQA-style quality anchors"),
    "train-attributes": ("flows.train_attributes", "train the occlusion/expression/lighting CNN on WIDER FACE"),
    "train": ("flows.train", "train CLIB-FIQA (stage 1, confidence calibration, stage 2)"),
    "score": ("flows.score", "score samples with a CLIB-FIQA checkpoint"),
    "export": ("flows.export", "export a checkpoint's scorer as one ONNX graph"),
    "evaluate": ("flows.evaluate", "EDC/ERC evaluation of quality methods on verification benchmarks"),
    "sql": ("flows.sql", "run read-only SQL on the catalog"),
    "shell": ("flows.sql", "interactive read-only SQL shell on the catalog (what 'fiqa sql' with no query opens)"),
    "stats": ("flows.stats", "factor distributions, cross-tabs and anchor histograms"),
    "compact": ("flows.compact", "rebuild the snapshots behind the latest views from every shard"),
    "gallery": ("flows.gallery", "one HTML page of face crops per factor class, quality decile and run"),
    "deploy": ("flows.deploy", "register or serve scheduled deployments"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fiqa",
        description="CLIB-FIQA data pipeline: ingest, label, anchors, train, score, evaluate.",
        epilog="Run 'fiqa COMMAND --help' for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


class DefaultsShown(argparse.HelpFormatter):
    """Every option's help names its default, unless the help already does or there is none to name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    prefect_defaults(quiet_console=argv[:2] != ["deploy", "serve"])  # served runs log to the console too
    mod = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fiqa {name}", description=help_text, formatter_class=DefaultsShown)
    mod.configure_parser(parser)
    return run_command(parser.prog, mod, parser.parse_args(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
