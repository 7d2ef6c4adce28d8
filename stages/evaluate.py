"""Evaluate one run (or a base variant with no adapter) on the test split.

    dvc repro evaluate@smollm2-135m-4bit-balanced_safe
    dvc repro baseline@smollm2-135m-4bit
"""

import argparse
from pathlib import Path

import triage  # selects the fast BLAS before MLX loads
from mlx_lm import load

from triage.backend import optimize_quantized_matmul
from triage.config import load_params
from triage.evaluation import completion_loss, evaluation_report, label_probabilities, prediction_rows
from triage.io import write_json, write_jsonl
from triage.lm import ChatFormat, tokenize_split
from triage.schema import read_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="run name recorded in the metrics")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, help="adapter directory; omit for the zero-shot baseline")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    args = parser.parse_args()

    params = load_params()
    model, tokenizer = load(str(args.model_dir), adapter_path=str(args.adapter) if args.adapter else None)
    switched = optimize_quantized_matmul(model)
    print(f"[evaluate] BLAS: {triage.BLAS}; {switched} quantized layers dequantize per call on CPU")
    fmt = ChatFormat(tokenizer)
    test_path = args.data / "test.jsonl"
    examples = read_examples(test_path)
    cases = tokenize_split(fmt, examples, str(test_path), params.train.max_seq_length)

    probs = label_probabilities(model, fmt, examples)
    loss = completion_loss(model, cases, params.evaluate.batch_size)
    report = evaluation_report(examples, probs, loss, params.evaluate)
    write_jsonl(args.predictions, prediction_rows(examples, probs, params.evaluate))
    write_json(args.metrics, {"run": args.run, "adapter": bool(args.adapter), **report})
    print(f"[evaluate] {args.run}: accuracy {report['accuracy']:.3f}, ED recall "
          f"{report['ed_recall']}, safe {report['safe']} -> {args.metrics}")


if __name__ == "__main__":
    main()
