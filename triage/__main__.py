"""Command line: ask a trained run to triage messages, or export it as a standalone model.

python -m triage predict --run smollm2-135m-4bit-balanced_safe "I have crushing chest pain"
python -m triage predict --run smollm2-135m-4bit-balanced_safe --json --file messages.jsonl
python -m triage export --run smollm2-135m-4bit-balanced_safe --out exported/triage-model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.config import ParamsError, load_params
from triage.io import iter_jsonl
from triage.offline_plots import TEMPLATE_PATH, write_html_template
from triage.predict import NOT_FOR_CLINICAL_USE, Triager, UnknownRun, export_run, resolve_run
from triage.schema import DataError, read_examples


def read_messages(path: Path) -> list[tuple[str, str]]:
    """(id, text) pairs from a JSONL file with a `text` field per line (and an optional `id`)."""
    messages, lines = [], {}
    for line, row in iter_jsonl(path):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, line, "text", "each line needs a JSON object with a non-empty string field 'text'")
        case_id = str(row.get("id", line))
        if case_id in lines:
            raise DataError(path, line, "id", f"id {case_id!r} is already on line {lines[case_id]}; ids must be unique")
        lines[case_id] = line
        messages.append((case_id, text))
    if not messages:
        raise DataError(path, None, None, "no messages: the file has no non-blank line")
    return messages


def show(result: dict, text: str) -> str:
    probs = "  ".join(f"{label} {result[f'p_{label}']:.2f}" for label in ("ED", "GP", "HOME"))
    others = ", ".join(
        f"{rule} {result[rule]}"
        for rule in ("argmax", "cost_aware", "ed_threshold")
        if rule in result and rule != result["decision_rule"]
    )
    if "mc_uncertainty" in result:
        flag = " -> FLAGGED for review" if result["flagged"] else ""
        uncertainty = f"MC-dropout uncertainty {result['mc_uncertainty']:.3f}{flag}"
    else:
        uncertainty = result["mc_dropout"]
    return f"{text}\n  {result['pred']} ({result['decision_rule']} rule; {others})  ({probs})  {uncertainty}"


def predict(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    if args.file:
        messages = read_messages(args.file)
    else:
        text = " ".join(args.text)
        if not text.strip():
            raise DataError("<command line>", None, "text", "the message is empty")
        messages = [("1", text)]
    triager = Triager(
        resolve_run(args.root, args.run),
        params.evaluate,
        params.train.cpu_streams,
        params.train.max_seq_length,
        str(args.file or "<command line>"),
    )
    if not args.json:
        print(NOT_FOR_CLINICAL_USE, file=sys.stderr)
    for (_, text), result in zip(messages, triager.triage(messages)):
        print(json.dumps(result) if args.json else show(result, text), flush=True)


def export(args: argparse.Namespace) -> None:
    paths = resolve_run(args.root, args.run)
    if paths.adapter_dir is None:
        raise UnknownRun(f"'{args.run}' is a base variant without an adapter; export a trained run")
    test = args.root / "data" / "prepared" / "test.jsonl"
    if not test.is_file():
        raise DataError(
            test, None, None, "the test split checks the export against base + adapter; run `dvc repro` first"
        )
    prompts = [example.prompt for example in read_examples(test)]
    check = export_run(paths, args.out, prompts, load_params(args.params).evaluate.batch_size)
    print(f"exported {args.run} (adapter fused into its base) to {args.out}; load it with mlx_lm.load('{args.out}')")
    print(
        f"check on the {check.cases} test cases: argmax agreement with base + adapter {check.agreement:.1%}, "
        f"largest label-probability difference {check.max_abs_diff:.4f}"
    )


def offline_plots(args: argparse.Namespace) -> None:
    path = write_html_template(args.out or args.root / TEMPLATE_PATH)
    print(f"wrote {path}: `dvc plots show` pages now carry Vega, Vega-Lite and Vega-Embed and render offline")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m triage", description=NOT_FOR_CLINICAL_USE)
    parser.add_argument("--root", type=Path, default=Path("."), help="the project directory (default: .)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("predict", help="triage a message or every line of a JSONL file")
    ask.add_argument("--run", required=True, help="<model>-<bits>-<config>, or <model>-<bits> for no adapter")
    ask.add_argument("--json", action="store_true", help="one JSON object per line")
    source = ask.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="JSONL with a `text` field per line")
    source.add_argument("text", nargs="*", default=[], help="the message")
    ask.set_defaults(handler=predict)
    out = commands.add_parser("export", help="fuse a run's adapter into its base model")
    out.add_argument("--run", required=True)
    out.add_argument("--out", type=Path, required=True)
    out.set_defaults(handler=export)
    plots = commands.add_parser("offline-plots", help="write the HTML template that lets `dvc plots show` work offline")
    plots.add_argument("--out", type=Path, default=None, help=f"default: <root>/{TEMPLATE_PATH}")
    plots.set_defaults(handler=offline_plots)
    args = parser.parse_args(argv)
    if args.command == "predict" and not args.file and not args.text:
        parser.error("give a message or --file")
    try:
        args.handler(args)
    except (UnknownRun, DataError, ParamsError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
