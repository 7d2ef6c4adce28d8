"""Benchmark QLoRA training and label scoring on this machine (``make bench``).

    python bench/run.py                 # SmolLM2-135M float / 8-bit / 4-bit + PyTorch reference
    python bench/run.py --smoke         # the tiny random model, seconds, no PyTorch
    python bench/run.py --model gemma3-270m --real-only --out bench/gemma3-270m.json

Writes ``bench/latest.json`` (atomically) and prints a table. Every number comes
from this run: the fp32 matmul peak, then per variant LoRA training steps through
mlx-lm's own trainer with the train stage's model set-up, loss and batches
(``triage.train``), label scoring, greedy generation and MC-dropout scoring,
then Hugging Face transformers + PEFT on PyTorch CPU (``bench/torch_peft.py``, in
a separate virtual environment that this script creates under the cache
directory on first use). The real workload
(``real_workload``) trains ``medical_baseline`` on the built-in train split, in
the train stage's batch order, on both sides. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from triage.config import LoraConfig, load_params
from triage.evaluate.mc_dropout import mc_dropout_votes
from triage.io import write_json
from triage.model.completion import collate, plain_loss
from triage.model.device import cpu_streams, measure_blas_in_subprocess, optimize_for_device
from triage.model.lm import ChatFormat, TokenizedCase, label_log_probs, tokenize_split
from triage.model.mlx_lm_internals import blocks, tied_embedding
from triage.model.scoring import label_probabilities
from triage.runtime.blas import THREADS_ENV, set_blas_threads
from triage.runtime.blas_proof import this_cpu
from triage.schema import Example
from triage.train.batches import batch_order, batches_per_epoch, make_iterate_batches, shared_length
from triage.train.loop import NEVER, training_loss
from triage.train.losses import objective
from triage.train.wiring import lora_model

ROOT = Path(__file__).resolve().parent.parent
PARAMS = load_params(ROOT / "params.yaml")  # the study's model sources, label mix, group size and train stage
BENCHED = ("smollm2-135m", "gemma3-270m", "tiny")
REAL_CONFIG = "medical_baseline"  # the config the real workload trains, as the train stage would
MODELS = {name: PARAMS.models[name].source for name in BENCHED}
VARIANTS = {"float": None, "q8": 8, "q4": 4}  # name -> bits (None: the float32 model)
GROUP_SIZE = PARAMS.quantize.group_size
TORCH_REQUIREMENTS = ("torch==2.13.0", "peft==0.21.2", "transformers==5.23.0")

FLOPS_FORMULA = (
    "per step: 2*P_blocks*B*T (forward through every block) + 2*P_top*B*T (backward through the "
    "frozen weights of the adapted top blocks only: gradients stop below the lowest adapter, and "
    "frozen weights get no weight gradient) + 2*2*P_vocab*B*C (vocabulary projection forward and "
    "backward, only at the C completion positions where the loss computes it). P_blocks/P_top: "
    "matmul weights of all / the adapted transformer blocks; P_vocab = vocab x hidden; embedding "
    "lookup, norms, attention score/value products (~8% of the forward at T=256), LoRA's own "
    "matmuls and the padding of C to a multiple of 8 are not counted, so the count is conservative"
)


@dataclass(frozen=True)
class Setup:
    """What one benchmark run measures; the defaults are the issue's specification."""

    model: str = "smollm2-135m"
    batch_size: int = 4
    seq_len: int = 256
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.1  # > 0 so that MC dropout has something to sample; training uses it too
    num_layers: int = 16
    warmup_steps: int = 1
    steps: int = 5  # the best of these is reported: other load on a shared machine only ever slows a step
    eval_cases: int = 16
    eval_batch_size: int = PARAMS.evaluate.batch_size
    generation_cases: int = 2
    mc_copies: int = 50
    cpu_streams: int = PARAMS.train.cpu_streams
    mc_sequential_variant: str = "q4"  # 50 sequential passes cost ~a minute per variant: one variant
    torch: bool = True
    real_steps: int = 24  # the real workload's timed steps: every one counts, as in a run
    real_only: bool = False


# --------------------------------------------------------------------------
# Inputs: models and token sequences
# --------------------------------------------------------------------------


def prepare_models(model: str, cache: Path) -> dict[str, Path]:
    """Float32 MLX model, its 8- and 4-bit variants and (GGUF sources) the HF directory, cached."""
    from triage.weights.gguf import convert_gguf
    from triage.weights.packaged import locate_package_gguf
    from triage.weights.sources import fetch_base_model, quantize_model

    root = cache / model
    source = MODELS[model]
    paths = {"float": root / "float"}
    if not paths["float"].exists():  # fetch_base_model publishes atomically: present means complete
        print(f"[bench] converting {source} (once, cached in {root})", flush=True)
        fetch_base_model(model, source, paths["float"])
    for name, bits in VARIANTS.items():
        if bits is not None:
            paths[name] = root / name
            if not paths[name].exists():
                quantize_model(paths["float"], paths[name], bits=bits, group_size=GROUP_SIZE)
    kind, _, where = source.partition(":")
    if kind == "gguf-package":  # the float32 HF checkpoint PyTorch loads, from the same GGUF
        paths["hf"] = root / "hf"
        if not paths["hf"].exists():
            package, _, filename = where.partition("/")
            convert_gguf(locate_package_gguf(package, filename), paths["hf"])
    else:  # mlx-lm writes llama checkpoints with Hugging Face tensor names
        paths["hf"] = paths["float"]
    return paths


def real_examples(n: int) -> list[Example]:
    """Cases from the built-in generator with params.yaml's default label mix (the study's data)."""
    from triage.data.synth import generate

    return generate(n, PARAMS.data.label_mix, seed=PARAMS.data.seed)


def median_completion_tokens(cases: list[TokenizedCase]) -> int:
    """Typical completion length in tokens ("LABEL - reason" plus end-of-turn)."""
    return int(statistics.median(len(c.tokens) - c.prompt_length for c in cases))


def typical_examples(examples: list[Example], cases: list[TokenizedCase], n: int) -> list[Example]:
    """``n`` examples whose prompt lengths in tokens lie around the median, the median one first."""
    order = sorted(range(len(cases)), key=lambda i: cases[i].prompt_length)
    start = max(0, len(order) // 2 - n // 2)
    picked = order[start : start + n]
    median = order[len(order) // 2]
    return [examples[i] for i in [median] + [i for i in picked if i != median]][:n]


def fixed_length_cases(cases: list[TokenizedCase], seq_len: int, completion: int, n: int) -> list[TokenizedCase]:
    """``n`` cases of exactly ``seq_len`` tokens: a real prompt (repeated to fill) and ``completion``
    real completion tokens.

    Exactly ``seq_len`` so that the collated input is ``seq_len`` wide (collate pads
    to a multiple of 8 plus the shifted target); the content only has to be
    realistic tokens, the shapes decide the speed.
    """
    prompt_len = seq_len - completion
    out = []
    usable = [c for c in cases if len(c.tokens) - c.prompt_length >= completion]
    for case in usable[:n]:
        prompt = case.tokens[: case.prompt_length]
        filled = (prompt * (prompt_len // len(prompt) + 1))[:prompt_len]
        answer = case.tokens[case.prompt_length : case.prompt_length + completion]
        out.append(TokenizedCase(filled + answer, prompt_len, case.label))
    if len(out) < n:
        raise ValueError(f"only {len(out)} generated cases have {completion}+ completion tokens; need {n}")
    return out


# --------------------------------------------------------------------------
# FLOP count
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopModel:
    """Matmul weight counts of the architecture (from the float model's shapes)."""

    block_params: tuple[int, ...]  # 2-D weights per transformer block, bottom to top
    vocab_params: int  # vocabulary x hidden (the tied or separate output projection)

    def train_step(self, tokens: int, completion_positions: int, adapted_blocks: int) -> float:
        """FLOPs of one LoRA step, as :data:`FLOPS_FORMULA` says."""
        forward = 2 * sum(self.block_params) * tokens
        backward = 2 * sum(self.block_params[-adapted_blocks:]) * tokens
        head = 2 * 2 * self.vocab_params * completion_positions
        return float(forward + backward + head)


def flop_model(float_dir: Path) -> FlopModel:
    """Count weights from shapes only (lazy load: no weight is read)."""
    from mlx_lm.utils import load_model

    model, _ = load_model(float_dir, lazy=True)
    weights = tuple(
        sum(w.size for name, w in tree_flatten(block.parameters()) if name.endswith("weight") and w.ndim == 2)
        for block in blocks(model)
    )
    embedding = tied_embedding(model)
    head = model.lm_head if embedding is None else embedding
    return FlopModel(weights, int(head.weight.size))


# --------------------------------------------------------------------------
# MLX measurements
# --------------------------------------------------------------------------


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn`` with its result evaluated (MLX is lazy)."""
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def lora_config(setup: Setup) -> LoraConfig:
    return LoraConfig(
        kind="standard",
        learning_rate=1e-5,
        batch_size=setup.batch_size,
        rank=setup.rank,
        scale=setup.scale,
        dropout=setup.dropout,
        iters=setup.warmup_steps + setup.steps,
    )


def train_step_seconds(model, cases: list[TokenizedCase], setup: Setup, scratch: Path) -> list[float]:
    """Per-step wall time of the synthetic shape: the plain loss on ``cases``, as the train stage splits a batch."""
    loss = training_loss(
        model, plain_loss, cases, replace(PARAMS.train, cpu_streams=setup.cpu_streams, share_prompt_prefix=False)
    )
    batches = make_iterate_batches(mask_prompt=True, seed=0, share_prefix=False)  # B x T as it is, like PEFT's
    return mlx_step_seconds(
        model, cases, loss, batches, setup.batch_size, setup.warmup_steps + setup.steps, setup.seq_len + 1, scratch
    )


def mlx_step_seconds(
    model,
    dataset: list[TokenizedCase],
    loss,
    iterate_batches,
    batch_size: int,
    steps: int,
    max_seq_length: int,
    scratch: Path,
) -> list[float]:
    """Per-step wall time of mlx-lm's own ``train`` (compiled step, AdamW) with the project's loss and batches.

    The loss splits the batch over the CPU streams as the train stage does, BLAS threads divided
    among them; the BLAS thread count is restored afterwards for the scoring measurements.

    mlx-lm times each step from after the batch is built to after the update is
    evaluated and reports it through the callback as iterations per second.
    """
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train

    class StepTimes(TrainingCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_loss_report(self, info: dict) -> None:
            self.times.append(1.0 / info["iterations_per_second"])

    args = TrainingArgs(
        batch_size=batch_size,
        iters=steps,
        steps_per_report=1,
        steps_per_eval=NEVER,
        steps_per_save=NEVER,
        max_seq_length=max_seq_length,
        adapter_file=str(scratch / "adapters.safetensors"),
    )
    callback = StepTimes()
    optimizer = optim.AdamW(learning_rate=1e-5, weight_decay=0.01)
    threads = blas_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm's progress lines would break our table
            train(
                model,
                optimizer,
                dataset,
                None,
                args,
                loss=loss,
                iterate_batches=iterate_batches,
                training_callback=callback,
            )
    finally:
        set_blas_threads(threads)
    return callback.times


def scoring_seconds_per_case(model, fmt: ChatFormat, examples: list[Example], batch_size: int, streams: list) -> float:
    """Label scoring as evaluation does it: right-padded batches of ``batch_size`` cases on the CPU streams."""
    label_probabilities(model, fmt, [e.prompt for e in examples[:batch_size]], batch_size, streams)  # warm-up
    start = time.perf_counter()
    label_probabilities(model, fmt, [e.prompt for e in examples], batch_size, streams)
    return (time.perf_counter() - start) / len(examples)


def generation_seconds_per_case(model, tokenizer, fmt: ChatFormat, examples: list[Example], max_tokens: int) -> float:
    """Greedy ``mlx_lm.generate`` of up to ``max_tokens`` answer tokens per case, dropout off."""
    from mlx_lm import generate

    model.eval()
    generate(model, tokenizer, fmt.prompt_tokens(examples[0].prompt), max_tokens=1)  # warm-up
    total = 0.0
    for example in examples:
        ids = fmt.prompt_tokens(example.prompt)
        start = time.perf_counter()
        generate(model, tokenizer, ids, max_tokens=max_tokens)  # returns text: evaluated
        total += time.perf_counter() - start
    return total / len(examples)


def mc_batch_seconds_per_case(model, fmt: ChatFormat, examples: list[Example], copies: int, streams: list) -> float:
    """MC dropout as evaluation runs it: ``copies`` samples of a case as one batch (the blocks below the
    first adapter once), one case per CPU stream at a time."""
    mc_dropout_votes(model, fmt, [e.prompt for e in examples[:1]], 2, seed=0)  # warm-up
    start = time.perf_counter()
    mc_dropout_votes(model, fmt, [e.prompt for e in examples], copies, seed=0, streams=streams)
    return (time.perf_counter() - start) / len(examples)


def mc_sequential_seconds(model, fmt: ChatFormat, prompt: str, copies: int) -> float:
    """The same samples as ``copies`` single passes, one after the other (how a loop over generate would)."""
    model.train()  # LoRA dropout on: every pass draws its own mask
    try:
        return sum(seconds(lambda: label_log_probs(model, fmt, prompt)) for _ in range(copies))
    finally:
        model.eval()


def per_element_ns(n: int = 1 << 20) -> dict:
    """Nanoseconds per element of the CPU ops a training step leans on besides matmuls.

    Shows where the time goes: transcendental functions (softmax's exp, SiLU's
    sigmoid), dropout's random masks and dequantization, next to a plain add.
    """
    x = mx.random.normal((n,))
    w, scales, biases = mx.quantize(mx.random.normal((n // 576, 576)), group_size=GROUP_SIZE, bits=4)
    mx.eval(x, w, scales, biases)
    ops = {
        "add": lambda: x + 1.0,
        "exp": lambda: mx.exp(x),
        "sigmoid": lambda: mx.sigmoid(x),
        "bernoulli": lambda: mx.random.bernoulli(0.9, x.shape),
        "dequantize_4bit": lambda: mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=4),
    }
    result = {}
    for name, op in ops.items():
        seconds(op)  # warm-up
        result[name] = min(seconds(op) for _ in range(3)) / n * 1e9
    return result


def measure_variant(
    name: str,
    path: Path,
    train_cases: list[TokenizedCase],
    examples: list[Example],
    setup: Setup,
    flops: FlopModel,
    completion: int,
    peak: float,
    scratch: Path,
) -> dict:
    """Training, scoring, generation and MC-dropout numbers of one model variant."""
    trainee = lora_model(path, lora_config(setup), setup.num_layers)
    model, fmt, tokenizer = trainee.model, trainee.fmt, trainee.fmt.tokenizer
    tokens = setup.batch_size * setup.seq_len

    mx.reset_peak_memory()
    steps = train_step_seconds(model, train_cases, setup, scratch)
    peak_memory = mx.get_peak_memory() / 2**20
    best = min(steps[setup.warmup_steps :])
    step_flops = flops.train_step(tokens, setup.batch_size * completion, setup.num_layers)

    # Inference as evaluate and predict run it (on a CPU: weights dequantized to fp32 once). The
    # one-at-a-time references first, with every BLAS thread, as a generate loop would run them;
    # then scoring and MC dropout as evaluate runs them, on the CPU streams.
    optimize_for_device(model, inference=True)
    generated = examples[: setup.generation_cases]
    generation = generation_seconds_per_case(model, tokenizer, fmt, generated, max_tokens=completion)
    label_only = generation_seconds_per_case(model, tokenizer, fmt, generated, max_tokens=1)
    sequential = None
    if name == setup.mc_sequential_variant:
        sequential = mc_sequential_seconds(model, fmt, examples[0].prompt, setup.mc_copies)
    threads = blas_threads()
    try:
        streams = cpu_streams(setup.cpu_streams)
        scoring = scoring_seconds_per_case(model, fmt, examples[: setup.eval_cases], setup.eval_batch_size, streams)
        mc_batch = mc_batch_seconds_per_case(model, fmt, examples[: max(1, len(streams))], setup.mc_copies, streams)
    finally:
        set_blas_threads(threads)
    result = {
        "cpu_path": trainee.device,
        "train_step_seconds": [round(s, 3) for s in steps],
        "train_tokens_per_s": tokens / best,
        "train_tokens_per_s_median": tokens / statistics.median(steps[setup.warmup_steps :]),
        "train_gflops": step_flops / best / 1e9,
        "train_mfu": step_flops / best / 1e9 / peak,
        "peak_memory_mb": peak_memory,
        "eval_cases_per_s": 1.0 / scoring,
        "mc_samples_per_s": setup.mc_copies / mc_batch,
        "label_scoring_s_per_case": scoring,
        "generation_s_per_case": generation,
        "generation_label_only_s_per_case": label_only,
        "mc_batch_s": mc_batch,
    }
    if sequential is not None:
        result["mc_sequential_s"] = sequential
    return result


# --------------------------------------------------------------------------
# The real job: medical_baseline on the built-in train split
# --------------------------------------------------------------------------


def real_train_cases(fmt: ChatFormat) -> list[TokenizedCase]:
    """The built-in train split, tokenised as the train stage tokenises it."""
    from triage.data.sources import load_splits

    return tokenize_split(
        fmt, load_splits(PARAMS.data)["train"], "the built-in train split", PARAMS.train.max_seq_length
    )


def step_shape(cases: list[TokenizedCase], batch: list[int], shared: int) -> tuple:
    """The array shapes of a collated batch: mlx-lm's compiled step is traced once per shape."""
    return tuple(array.shape for array in collate([cases[i] for i in batch], PARAMS.train.mask_prompt, shared))


def train_stage_order(cases: list[TokenizedCase]):
    """The train stage's endless batch order on ``cases`` for the real workload's config."""
    return batch_order(
        len(cases), [len(c.tokens) for c in cases], PARAMS.config(REAL_CONFIG).batch_size, PARAMS.train.seed
    )


def real_batches(cases: list[TokenizedCase], shared: int, setup: Setup) -> tuple[list[list[int]], list[list[int]]]:
    """(warm-up, timed) batches of case indices; both sides train on exactly these, in this order.

    Timed: the train stage's first ``real_steps`` batches, in its order. Warm-up:
    before them, the first of those batches of each shape (plain and shared), so
    that every timed step runs an already compiled step, as nearly every step of
    a full run does; the one-off compilations are reported apart.
    """
    order = train_stage_order(cases)
    timed = [next(order) for _ in range(setup.real_steps)]
    first_of_shape: dict[tuple, list[int]] = {}
    for batch in timed:
        first_of_shape.setdefault((step_shape(cases, batch, 0), step_shape(cases, batch, shared)), batch)
    return list(first_of_shape.values()), timed


def shapes_per_epoch(cases: list[TokenizedCase], shared: int) -> int:
    """How many step shapes (so compilations) one epoch of the train stage's batches needs."""
    order = train_stage_order(cases)
    epoch = batches_per_epoch(len(cases), PARAMS.config(REAL_CONFIG).batch_size)
    return len({step_shape(cases, next(order), shared) for _ in range(epoch)})


def real_step_positions(cases: list[TokenizedCase], batches: list[list[int]], shared: int) -> float:
    """Mean token positions a step runs through the model: the padded rows, plus the prefix's one row."""
    sizes = [step_shape(cases, batch, shared)[0] for batch in batches]
    return shared + statistics.mean(rows * (width - 1) for rows, width in sizes)


def real_workload_variant(
    path: Path, cases: list[TokenizedCase], warmup: list[list[int]], timed: list[list[int]], shared: int, scratch: Path
) -> dict:
    """The train stage's steps of ``medical_baseline`` on one variant: its loss, its collate, its streams.

    ``shared`` is the prefix length its batches share (0: the plain batch).
    """
    config = PARAMS.config(REAL_CONFIG)
    trainee = lora_model(path, config, PARAMS.train.num_layers)
    model = trainee.model
    loss = training_loss(
        model,
        objective(config, trainee.fmt.label_first_tokens, PARAMS.train.label_weight),
        cases,
        replace(PARAMS.train, share_prompt_prefix=shared > 0),
    )

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, **_):
        for batch in warmup + timed:
            yield collate([dataset[i] for i in batch], PARAMS.train.mask_prompt, shared)

    mx.reset_peak_memory()
    steps = mlx_step_seconds(
        model,
        cases,
        loss,
        iterate_batches,
        config.batch_size,
        len(warmup) + len(timed),
        PARAMS.train.max_seq_length,
        scratch,
    )
    compiled, measured = steps[: len(warmup)], steps[len(warmup) :]
    return {
        "share_prompt_prefix": shared > 0,
        "warmup_step_seconds": [round(t, 3) for t in compiled],
        "step_seconds": [round(t, 3) for t in measured],
        "seconds_per_step": statistics.mean(measured),
        "cases_per_s": sum(map(len, timed)) / sum(measured),
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
    }


def real_workload(
    paths: dict[str, Path], fmt: ChatFormat, setup: Setup, cache: Path, torch_interpreter: Path | None, scratch: Path
) -> dict:
    """Ours at float, q8 and q4 (and q4 on the plain batch) against transformers + PEFT, same cases, same order."""
    cases = real_train_cases(fmt)
    shared = shared_length(cases, PARAMS.train.mask_prompt, PARAMS.train.share_prompt_prefix)
    warmup, timed = real_batches(cases, shared, setup)
    config = PARAMS.config(REAL_CONFIG)
    result: dict[str, Any] = {
        "config": REAL_CONFIG,
        "batch_size": config.batch_size,
        "rank": config.rank,
        "dropout": config.dropout,
        "num_layers": PARAMS.train.num_layers,
        "train_cases": len(cases),
        "warmup_steps": len(warmup),
        "timed_steps": len(timed),
        "mean_case_tokens": statistics.mean(len(c.tokens) for c in cases),
        "shared_prefix_tokens": shared,
        "token_positions_per_step": {
            "plain_batch": real_step_positions(cases, timed, 0),
            "shared_prefix": real_step_positions(cases, timed, shared),
        },
        "step_shapes_per_epoch": {
            "plain_batch": shapes_per_epoch(cases, 0),
            "shared_prefix": shapes_per_epoch(cases, shared),
        },
        "timing": "seconds_per_step is the mean of every timed step; the warm-up first runs one batch of each "
        "shape the timed steps have, so each timed step runs a compiled step, as nearly all steps of a "
        "run do (a run compiles once per shape: step_shapes_per_epoch); cases_per_s = cases / seconds",
    }
    for name in VARIANTS:
        print(f"[bench] real workload, {name}", flush=True)
        result[name] = real_workload_variant(paths[name], cases, warmup, timed, shared, scratch)
    print("[bench] real workload, q4 on the plain batch", flush=True)
    result["q4_plain_batch"] = real_workload_variant(paths["q4"], cases, warmup, timed, 0, scratch)
    spec = {
        "batches": [
            [{"tokens": cases[i].tokens, "prompt_length": cases[i].prompt_length} for i in batch]
            for batch in warmup + timed
        ]
    }
    result["torch_peft"] = torch_reference(
        setup,
        cache,
        torch_interpreter,
        paths["hf"],
        spec,
        scratch,
        rank=config.rank,
        scale=config.scale,
        dropout=config.dropout,
        num_layers=PARAMS.train.num_layers,
        warmup=len(warmup),
        steps=len(timed),
    )
    torch_rate = result["torch_peft"].get("cases_per_s")
    result["vs_torch_peft"] = result["q4"]["cases_per_s"] / torch_rate if torch_rate else None
    return result


# --------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------


def mlx_cores(setup: Setup) -> int:
    """Cores MLX's training uses: BLAS threads times CPU streams, so that PyTorch gets as many."""
    streams = setup.cpu_streams if setup.cpu_streams > 1 else 1
    per_stream = int(os.environ.get(THREADS_ENV, "0") or 0) or max(1, (os.cpu_count() or 1) // streams)
    return min(os.cpu_count() or 1, per_stream * streams) if streams > 1 else blas_threads()


def blas_threads() -> int:
    """Threads of the BLAS MLX multiplies with, so that PyTorch gets as many (else the core count)."""
    import ctypes

    try:
        return int(ctypes.CDLL(None).openblas_get_num_threads())
    except AttributeError:  # not OpenBLAS (reference BLAS, Accelerate): all cores
        return os.cpu_count() or 1


def torch_python(cache: Path) -> Path:
    """The interpreter of the PyTorch venv in ``cache``, created with pip on first use.

    Separate and without system site-packages so that the project's own
    environment never needs torch.
    """
    env = cache / "torch-venv"
    python = env / "bin" / "python"
    if not python.exists():
        print(f"[bench] creating {env} with {', '.join(TORCH_REQUIREMENTS)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *TORCH_REQUIREMENTS], capture_output=True, text=True
        )
        if pip.returncode != 0:
            python.unlink()  # so that the next run tries again
            raise RuntimeError(f"pip install {' '.join(TORCH_REQUIREMENTS)} failed: {pip.stderr.strip()[-2000:]}")
    return python


def run_torch(python: Path, hf_dir: Path, spec: dict, scratch: Path, **hyper: float) -> dict:
    """Run bench/torch_peft.py on the batches in ``spec`` (its BATCHES.json) with ``hyper`` as options.

    Returns its JSON result.
    """
    batches = scratch / "batches.json"
    batches.write_text(json.dumps(spec))
    out = scratch / "torch.json"
    options = [item for key, value in hyper.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    command = [
        str(python),
        str(Path(__file__).with_name("torch_peft.py")),
        "--model-dir",
        str(hf_dir),
        "--batches",
        str(batches),
        "--out",
        str(out),
        *options,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"torch_peft.py failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def target(value: float | None, threshold: float, what: str) -> dict:
    """A ratio target: met when ``value >= threshold``; None means it could not be measured."""
    return {
        "what": what,
        "value": value,
        "threshold": threshold,
        "met": None if value is None else bool(value >= threshold),
    }


def targets(report: dict, setup: Setup) -> dict:
    """The issues' targets, each a ratio measured within this run."""
    real = {
        "real_workload_vs_torch_peft": target(
            report["real_workload"]["vs_torch_peft"],
            1.5,
            f"real workload ({REAL_CONFIG} on the built-in train split, same batches): our 4-bit QLoRA cases/s / "
            "transformers+PEFT (PyTorch CPU, float32, labels -100 on the prompt) cases/s",
        )
    }
    if setup.real_only:
        return real
    variants = [report[name] for name in VARIANTS]
    torch_rate = report["torch_peft"].get("train_tokens_per_s")
    sequential = report[setup.mc_sequential_variant]
    return {
        "q4_vs_float_training": target(
            report["q4"]["train_tokens_per_s"] / report["float"]["train_tokens_per_s"],
            0.9,
            "4-bit QLoRA training tokens/s / float LoRA training tokens/s",
        ),
        "training_mfu": target(
            min(v["train_mfu"] for v in variants),
            0.5,
            "training step GFLOP/s / fp32 matmul peak, worst of float, q8, q4",
        ),
        "vs_torch_peft": target(
            report["float"]["train_tokens_per_s"] / torch_rate if torch_rate else None,
            1.5,
            "MLX float LoRA training tokens/s / transformers+PEFT (PyTorch CPU, float32) tokens/s",
        ),
        "label_scoring_vs_generation": target(
            min(v["generation_s_per_case"] / v["label_scoring_s_per_case"] for v in variants),
            10.0,
            f"greedy mlx_lm.generate of the answer (max_tokens = C = {report['setup']['completion_positions']}) "
            f"per case / label scoring per case in batches of {setup.eval_batch_size} as evaluate runs it, "
            "worst of float, q8, q4",
        ),
        "mc_batch_vs_sequential": target(
            sequential["mc_sequential_s"] / sequential["mc_batch_s"],
            5.0,
            f"{setup.mc_copies} sequential MC-dropout passes / one batch of {setup.mc_copies} (blocks below the "
            "first adapter run once, as evaluate runs it), "
            f"{setup.mc_sequential_variant}",
        ),
    } | real


def print_table(report: dict) -> None:
    from tabulate import tabulate

    if "setup" in report:
        print_synthetic(report)
    print_real_workload(report["model"], report["real_workload"])
    print()
    print(
        tabulate(
            [
                [name, t["value"], t["threshold"], {True: "met", False: "NOT met", None: "not measured"}[t["met"]]]
                for name, t in report["targets"].items()
            ],
            headers=["target", "ratio", "needs >=", "result"],
            floatfmt=".2f",
            missingval="-",
        )
    )


def print_synthetic(report: dict) -> None:
    from tabulate import tabulate

    rows = [
        [
            name,
            v["train_tokens_per_s"],
            v["train_gflops"],
            100 * v["train_mfu"],
            v["peak_memory_mb"],
            v["eval_cases_per_s"],
            v["mc_samples_per_s"],
        ]
        for name, v in ((n, report[n]) for n in VARIANTS)
    ]
    torch_result = report["torch_peft"]
    if "train_tokens_per_s" in torch_result:
        rows.append(
            [
                "torch+PEFT float",
                torch_result["train_tokens_per_s"],
                None,
                None,
                torch_result["peak_rss_mb"],
                None,
                None,
            ]
        )
    print(
        f"\n{report['model']}: batch {report['setup']['batch_size']} x {report['setup']['seq_len']} tokens, "
        f"LoRA rank {report['setup']['rank']} on {report['setup']['num_layers']} blocks; "
        f"fp32 matmul peak {report['matmul_peak_gflops']:.1f} GFLOP/s; load average "
        f"{report['machine']['load_average_start'][0]:.2f} -> {report['machine']['load_average_end'][0]:.2f}; "
        f"{report['machine']['cpu_model']}"
    )
    print(
        tabulate(
            rows,
            headers=["variant", "train tok/s", "GFLOP/s", "MFU %", "peak MB", "eval cases/s", "MC samples/s"],
            floatfmt=".1f",
            missingval="-",
        )
    )
    if "skipped" in torch_result:
        print(f"torch+PEFT: not measured ({torch_result['skipped']})")


def print_real_workload(model: str, real: dict) -> None:
    from tabulate import tabulate

    positions = real["token_positions_per_step"]
    print(
        f"\n{model}, real workload: {real['config']} (batch {real['batch_size']}, rank {real['rank']}) on the "
        f"built-in train split ({real['train_cases']} cases, {real['mean_case_tokens']:.0f} tokens on average, "
        f"{real['shared_prefix_tokens']} shared); {real['timed_steps']} timed steps after "
        f"{real['warmup_steps']} warm-up steps (one per shape); token positions per step "
        f"{positions['plain_batch']:.0f} plain, {positions['shared_prefix']:.0f} with the shared prefix; "
        f"{real['step_shapes_per_epoch']['shared_prefix']} step shapes per epoch"
    )
    names = [*VARIANTS, "q4_plain_batch"]
    rows = [
        [name, real[name]["seconds_per_step"], real[name]["cases_per_s"], real[name]["peak_memory_mb"]]
        for name in names
    ]
    torch_result = real["torch_peft"]
    if "cases_per_s" in torch_result:
        rows.append(
            [
                "torch+PEFT float",
                torch_result["seconds_per_step"],
                torch_result["cases_per_s"],
                torch_result["peak_rss_mb"],
            ]
        )
    print(tabulate(rows, headers=["variant", "s/step", "cases/s", "peak MB"], floatfmt=".3f"))
    if "skipped" in torch_result:
        print(f"torch+PEFT: not measured ({torch_result['skipped']})")


PEAK_PROCESSES = 3


def matmul_peak() -> tuple[float, list[float]]:
    """The fp32 matmul peak that MFU divides by: the best of PEAK_PROCESSES fresh processes, 5 repeats each.

    A peak read on busy cores is too low and inflates MFU, so this warns when the load
    is high and when the runs disagree by more than 20%.
    """
    load = os.getloadavg()[0]
    if load >= 0.5:
        print(
            f"[bench] WARNING: load average {load:.1f} while measuring the matmul peak: it may read low, "
            "and MFU (which divides by it) high",
            flush=True,
        )
    runs = [measure_blas_in_subprocess("auto", 1024, 5, blas_threads())["gflops"] for _ in range(PEAK_PROCESSES)]
    if min(runs) < 0.8 * max(runs):
        print(
            f"[bench] WARNING: matmul peak runs disagree ({', '.join(f'{r:.1f}' for r in runs)} GFLOP/s): "
            "another process competes for the cores",
            flush=True,
        )
    return max(runs), runs


def machine() -> dict:
    """Where the numbers come from; warns when other processes compete for the cores."""
    load, cpus = os.getloadavg(), os.cpu_count() or 1
    if load[0] >= cpus / 2:
        print(
            f"[bench] WARNING: load average {load[0]:.1f} on {cpus} cores: other processes compete, so the "
            "numbers will be low and noisy (TRIAGE_BLAS_THREADS=1 is steadier on a busy machine)",
            flush=True,
        )
    return {
        "platform": platform.platform(),
        "cpu_model": this_cpu().model,
        "cpus": cpus,
        "blas": triage.BLAS,
        "allocator": triage.ALLOCATOR,
        "schedule": triage.SCHEDULE,
        "blas_threads": blas_threads(),
        "mlx": mx.__version__,
        "load_average_start": list(load),
    }


def benchmark(setup: Setup, cache: Path, torch_interpreter: Path | None) -> dict:
    """Run every measurement once; return the report, targets included."""
    from mlx_lm.utils import load_tokenizer

    report: dict[str, Any] = {"model": setup.model, "source": MODELS[setup.model], "machine": machine()}
    paths = prepare_models(setup.model, cache)
    fmt = ChatFormat(load_tokenizer(paths["float"]))
    with tempfile.TemporaryDirectory() as scratch:
        if not setup.real_only:
            report |= synthetic(setup, paths, fmt, cache, torch_interpreter, Path(scratch))
        report["real_workload"] = real_workload(paths, fmt, setup, cache, torch_interpreter, Path(scratch))
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["targets"] = targets(report, setup)
    return report


def synthetic(
    setup: Setup, paths: dict[str, Path], fmt: ChatFormat, cache: Path, torch_interpreter: Path | None, scratch: Path
) -> dict:
    """The fixed B x T shape: training per variant with MFU, scoring, generation, MC dropout, and PEFT on it."""
    examples = real_examples(200)
    cases = [fmt.case(e) for e in examples]
    completion = median_completion_tokens(cases)
    train_cases = fixed_length_cases(cases, setup.seq_len, completion, 2 * setup.batch_size)
    typical = typical_examples(examples, cases, max(setup.eval_cases, setup.generation_cases))
    flops = flop_model(paths["float"])
    tokens = setup.batch_size * setup.seq_len
    report: dict[str, Any] = {
        "setup": {
            **asdict(setup),
            "completion_positions": completion,
            "completion_positions_note": "C: median completion length in tokens of the generated study data "
            "('LABEL - reason' + end of turn); also generation's max_tokens",
            "mc_prompt_tokens": len(fmt.prompt_tokens(typical[0].prompt)),
            "timing": "train_tokens_per_s and train_gflops use the fastest timed step (like the matmul peak: "
            "on a shared machine the rest is other load); every step time is listed",
        }
    }
    report["flops"] = {
        "formula": FLOPS_FORMULA,
        "per_train_step": flops.train_step(tokens, setup.batch_size * completion, setup.num_layers),
        "P_blocks": sum(flops.block_params),
        "P_top": sum(flops.block_params[-setup.num_layers :]),
        "P_vocab": flops.vocab_params,
        "B": setup.batch_size,
        "T": setup.seq_len,
        "C": completion,
    }
    report["matmul_peak_gflops"], report["matmul_peak_runs"] = matmul_peak()
    report["cpu_ns_per_element"] = per_element_ns()
    for name in VARIANTS:
        print(f"[bench] {name}: training, scoring, generation, MC dropout", flush=True)
        report[name] = measure_variant(
            name, paths[name], train_cases, typical, setup, flops, completion, report["matmul_peak_gflops"], scratch
        )
    spec = {
        "sequences": [c.tokens for c in train_cases],
        "batch_size": setup.batch_size,
        "completion_tokens": completion,
    }
    report["torch_peft"] = torch_reference(
        setup,
        cache,
        torch_interpreter,
        paths["hf"],
        spec,
        scratch,
        rank=setup.rank,
        scale=setup.scale,
        dropout=setup.dropout,
        num_layers=setup.num_layers,
        warmup=setup.warmup_steps,
        steps=setup.steps,
    )
    return report


def torch_reference(
    setup: Setup, cache: Path, interpreter: Path | None, hf_dir: Path, spec: dict, scratch: Path, **hyper: float
) -> dict:
    """The PyTorch numbers on ``spec``'s batches, with as many threads as MLX uses, or why there are none.

    The report says why instead of failing.
    """
    if not setup.torch:
        return {"skipped": "not requested (--no-torch or --smoke)"}
    print("[bench] torch+PEFT: training", flush=True)
    try:
        python = interpreter or torch_python(cache)
        return run_torch(python, hf_dir, spec, scratch, threads=mlx_cores(setup), **hyper)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return {"skipped": f"failed: {err}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=Setup.model)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model, one timed step, two cases, no PyTorch: checks the script in seconds",
    )
    parser.add_argument("--steps", type=int, default=Setup.steps, help="timed training steps per variant")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "latest.json")
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "bench" / ".cache",
        help="converted models and the PyTorch venv (git-ignored)",
    )
    parser.add_argument("--torch-python", type=Path, help="an existing interpreter with torch, transformers, peft")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--real-only", action="store_true", help="only the real workload (as for Gemma-3-270M)")
    parser.add_argument("--real-steps", type=int, default=Setup.real_steps, help="timed steps of the real workload")
    args = parser.parse_args()

    setup = Setup(
        model=args.model,
        steps=args.steps,
        torch=not args.no_torch,
        real_only=args.real_only,
        real_steps=args.real_steps,
    )
    if args.smoke:
        setup = replace(
            setup,
            model="tiny",
            seq_len=64,
            steps=1,
            eval_cases=4,
            eval_batch_size=2,
            generation_cases=1,
            mc_copies=4,
            torch=args.torch_python is not None,
            real_steps=2,
        )
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / ".gitignore").write_text("*\n")  # models and a venv: never committed
    started = time.perf_counter()
    report = benchmark(setup, args.cache, args.torch_python)
    report["wall_seconds"] = time.perf_counter() - started
    write_json(args.out, report)
    print_table(report)
    print(f"\nwrote {args.out} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
