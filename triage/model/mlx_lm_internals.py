"""Every use of mlx-lm beyond its public API, in one place: what to check here when mlx-lm changes.

Written against mlx-lm 0.32.2 (:data:`WRITTEN_AGAINST`). Public API, used
directly elsewhere: ``load``, ``generate``, ``mlx_lm.utils``, the tuner's
``train``, ``evaluate``, ``TrainingArgs``, ``TrainingCallback`` and
``linear_to_lora_layers``, and ``mlx_lm.models.cache.make_prompt_cache``.

Names (:data:`NAMES`, each with its reason; tests/test_mlx_lm_internals.py checks the installed mlx-lm has them):

* llama's and Gemma 3's ``scaled_dot_product_attention`` and llama's ``swiglu``,
  swapped for versions without MLX's slow CPU exp (:func:`swap_activations`);
* ``cli_ui.make_console``, replaced, and the private ``_make_theme`` and
  ``_terminal_width`` it is made with (:func:`trainer_display_only_on_a_terminal`);
* ``models.cache.KVCache``, subclassed by :class:`ContinuedCache`.

Conventions of mlx-lm's model and cache classes that no single name shows (the
equality tests of tests/test_lm.py and tests/test_shared_prefix.py exercise them):

* a model is a trunk ``model.model``, called as ``trunk(inputs, cache)`` and
  returning the final normalised hidden states, with its blocks in the list
  ``model.model.layers``, and a head ``lm_head`` or the tied
  ``model.model.embed_tokens.as_linear`` (:func:`hidden_states`, :func:`project`,
  :func:`blocks`, :func:`tied_embedding`, checked per model by :func:`check_supported`);
* the trunk calls each block as ``block(x, mask, cache)`` and reads flags off
  it (llama: ``use_sliding``), which stand-ins pass on (:mod:`triage.model.blocks`);
* a block writes its keys and values into its cache with one ``update_and_fetch``
  call (:func:`cache_writes`);
* every cache holds ``keys``, ``values`` and ``offset``, and a ``KVCache``'s
  buffer runs past ``offset`` (:func:`fork_cache`, :func:`cache_arrays`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import copy as shallow_copy
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import mlx.core as mx
import mlx.nn as nn

WRITTEN_AGAINST = "0.32.2"


class MlxLmChanged(RuntimeError):
    """The installed mlx-lm lacks a name this code relies on."""


@dataclass(frozen=True)
class Name:
    """A name in an mlx-lm module that is not public API, and why this code uses it."""

    module: str
    name: str
    reason: str

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"

    def missing(self) -> str:
        """What to say when the installed mlx-lm lacks the name."""
        return (
            f"mlx-lm {version('mlx-lm')} has no {self.path}, which triage uses ({self.reason}); "
            f"triage.model.mlx_lm_internals was written against mlx-lm {WRITTEN_AGAINST}"
        )

    def get(self) -> Any:
        """The named object; :class:`MlxLmChanged` saying which name when the installed mlx-lm has none."""
        try:
            return getattr(importlib.import_module(self.module), self.name)
        except (ImportError, AttributeError):
            raise MlxLmChanged(self.missing()) from None

    def replace(self, value: Any) -> None:
        """Rebind the name process-wide, for every caller that looks it up at call time."""
        self.get()
        setattr(importlib.import_module(self.module), self.name, value)


LLAMA_ATTENTION = Name(
    "mlx_lm.models.llama",
    "scaled_dot_product_attention",
    "llama's attention looks it up at call time: swapped for attention without MLX's slow CPU exp",
)
GEMMA3_ATTENTION = Name(
    "mlx_lm.models.gemma3_text",
    "scaled_dot_product_attention",
    "Gemma 3's attention looks it up at call time: swapped likewise",
)
LLAMA_SWIGLU = Name(
    "mlx_lm.models.llama",
    "swiglu",
    "llama's MLP looks it up at call time: swapped for SwiGLU without MLX's slow CPU exp",
)
MAKE_CONSOLE = Name(
    "mlx_lm.cli_ui",
    "make_console",
    "the trainer's display calls it: replaced by a console that is quiet off a terminal",
)
MAKE_THEME = Name("mlx_lm.cli_ui", "_make_theme", "private: mlx-lm's console theme, which its progress markup needs")
TERMINAL_WIDTH = Name("mlx_lm.cli_ui", "_terminal_width", "private: the width mlx-lm's own console takes")
KV_CACHE = Name(
    "mlx_lm.models.cache",
    "KVCache",
    "subclassed to continue a prefix's keys and values without copying its preallocated buffer",
)
NAMES = (LLAMA_ATTENTION, GEMMA3_ATTENTION, LLAMA_SWIGLU, MAKE_CONSOLE, MAKE_THEME, TERMINAL_WIDTH, KV_CACHE)


def missing_names() -> list[str]:
    """Why each listed name the installed mlx-lm lacks is needed; empty when it has them all."""
    found = []
    for name in NAMES:
        try:
            name.get()
        except MlxLmChanged as gone:
            found.append(str(gone))
    return found


# --- Patches -------------------------------------------------------------------


def _calling(attention: Callable[..., mx.array], original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    """mlx-lm's attention signature around ``attention(queries, keys, values, scale, mask)``."""

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if sinks is not None or hasattr(cache, "bits"):  # attention sinks, quantized KV cache: keep mlx-lm's
            return original(queries, keys, values, cache, scale, mask, sinks)
        return attention(queries, keys, values, scale, mask)

    scaled_dot_product_attention.fast_cpu = True
    return scaled_dot_product_attention


def swap_activations(attention: Callable[..., mx.array], swiglu: Callable[..., mx.array]) -> list[str]:
    """Make llama and Gemma 3 attend with ``attention`` and llama's MLP use ``swiglu``; the names swapped (once)."""
    swapped = []
    for name in (LLAMA_ATTENTION, GEMMA3_ATTENTION):
        current = name.get()
        if not getattr(current, "fast_cpu", False):
            name.replace(_calling(attention, current))
            swapped.append(name.path)
    if LLAMA_SWIGLU.get() is not swiglu:
        LLAMA_SWIGLU.replace(swiglu)
        swapped.append(LLAMA_SWIGLU.path)
    return swapped


def trainer_display_only_on_a_terminal() -> None:
    """Let mlx-lm's trainer draw its table and progress bar only on a terminal, coloured unless ``NO_COLOR`` is set.

    Its console forces truecolor and rich prints a finished bar even to a file,
    so stage logs and ``dvc queue logs`` would carry ANSI codes, a bar and a
    second copy of the loss table. Off a terminal that console is quiet and the
    log keeps the monitor's plain ``[train] step`` lines (step, loss, ETA).
    The theme is mlx-lm's, which its progress markup needs.
    """
    from rich.console import Console

    def console() -> Console:
        shown = Console(theme=MAKE_THEME.get()(), highlight=False, width=TERMINAL_WIDTH.get()())
        shown.quiet = not shown.is_terminal
        return shown

    MAKE_CONSOLE.replace(functools.lru_cache(maxsize=1)(console))


# --- The model's layout --------------------------------------------------------


def hidden_states(model: nn.Module, inputs: mx.array, cache: list | None = None) -> mx.array:
    """Final normalised hidden states, before the vocabulary projection."""
    return model.model(inputs, cache)


def blocks(model: nn.Module) -> list:
    """The transformer blocks, bottom to top: the trunk's own list, so assigning to it swaps blocks."""
    return model.model.layers


def tied_embedding(model: nn.Module) -> nn.Module | None:
    """The input embedding when it doubles as the output head; None when the model has an ``lm_head``."""
    return None if "lm_head" in model else model.model.embed_tokens


def project(model: nn.Module, hidden: mx.array) -> mx.array:
    """The vocabulary projection, tied or not, as mlx-lm's llama and gemma3 models do it."""
    embedding = tied_embedding(model)
    return model.lm_head(hidden) if embedding is None else embedding.as_linear(hidden)


def check_supported(model: nn.Module) -> None:
    """Fail early for an architecture whose output head we cannot call separately."""
    if "model" not in model or not ("lm_head" in model or "embed_tokens" in model.model):
        raise TypeError(
            f"model type {getattr(model, 'model_type', type(model).__name__)} does not expose "
            "model.model and an lm_head or tied embed_tokens; it is not supported"
        )


# --- Caches --------------------------------------------------------------------

_KVCache = KV_CACHE.get()


class ContinuedCache(_KVCache):
    """A KVCache holding exactly the keys and values of a prefix; new tokens are appended by concatenation.

    mlx-lm's own KVCache writes into a preallocated 256-token buffer; forked for
    every row of a batch and differentiated through, copying and slice-updating
    that buffer costs more than the attention itself.
    """

    def __init__(self, keys: mx.array, values: mx.array):
        super().__init__()
        self.keys, self.values, self.offset = keys, values, keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.concatenate([self.keys, keys], axis=2)
        self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values


def fork_cache(cache: list, rows: int) -> list:
    """Copies of a cache for ``rows`` input rows; the original stays as it was.

    Each layer's cache is tiled ``rows`` times: a one-row prefix becomes one
    copy per row, and a layer above an MC fan-out (``samples`` rows, one per
    dropout mask) becomes ``rows`` x ``samples`` rows in the order the fan-out
    makes them. A sliding-window layer's rotating cache is copied with its
    settings; a full-attention layer's continues as a :class:`ContinuedCache`.
    """

    def tiled(array: mx.array) -> mx.array:
        return mx.tile(array, (rows,) + (1,) * (array.ndim - 1))

    forked = []
    for layer in cache:
        if type(layer) is _KVCache and layer.keys is not None:
            end = layer.offset
            forked.append(ContinuedCache(tiled(layer.keys[..., :end, :]), tiled(layer.values[..., :end, :])))
            continue
        copy = shallow_copy(layer)  # offsets, window and step settings carry over
        if layer.keys is not None:
            copy.keys, copy.values = tiled(layer.keys), tiled(layer.values)
        forked.append(copy)
    return forked


def cache_arrays(cache: list) -> list[tuple[mx.array, mx.array]]:
    """Every layer's keys and values, to evaluate a cache once rather than with each use."""
    return [(layer.keys, layer.values) for layer in cache]


@contextmanager
def cache_writes(cache: Any) -> Iterator[list[tuple[mx.array, mx.array]]]:
    """Inside, every (keys, values) written into this one layer's ``cache`` is also appended to the list yielded."""
    update_and_fetch = cache.update_and_fetch
    writes: list[tuple[mx.array, mx.array]] = []

    def recording(keys: mx.array, values: mx.array):
        writes.append((keys, values))
        return update_and_fetch(keys, values)

    cache.update_and_fetch = recording
    try:
        yield writes
    finally:
        del cache.update_and_fetch
