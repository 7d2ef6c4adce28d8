"""Language-model plumbing: chat formatting, tokenised cases, the shared prompt prefix and label scoring.

The model sees one user turn (the prompt) and answers with the completion. The
label options are scored as the tokens that begin the assistant's answer.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from os.path import commonprefix

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from triage.model.frozen import FrozenPrefix
from triage.model.mlx_lm_internals import cache_arrays, fork_cache, hidden_states, project
from triage.schema import LABELS, DataError, Example

FALLBACK_TEMPLATE_USER = "{prompt}\n\nTriage:"


@dataclass(frozen=True)
class TokenizedCase:
    """Token ids of prompt plus completion, the prompt length, the label index and how many tokens spell the label.

    The completion starts with the label's ``label_length`` tokens; the reason text follows.
    """

    tokens: list[int]
    prompt_length: int
    label: int
    label_length: int = 1


class ChatFormat:
    """Turns prompts and completions into token ids with the model's chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.label_tokens = [self._encode(label) for label in LABELS]
        first = [ids[0] for ids in self.label_tokens]
        if len(set(first)) != len(LABELS):
            raise ValueError(
                f"the label options {LABELS} start with the same token in this tokenizer "
                f"({first}); the label distribution needs distinct first tokens"
            )
        self.label_first_tokens = first

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_tokens(self, prompt: str) -> list[int]:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}]
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return self._encode(FALLBACK_TEMPLATE_USER.format(prompt=prompt) + " ")

    def case(self, example: Example) -> TokenizedCase:
        """Prompt and completion tokens; the completion begins with exactly the label's scored tokens.

        The label's tokens are ``label_tokens`` whatever the tokenizer would make
        of the whole completion, so cross-entropy trains the tokens that scoring
        and the cost term read. Raises ValueError unless the completion starts
        with its label (the importers strip whitespace before it).
        """
        if not example.completion.startswith(example.label):
            raise ValueError(
                f"the completion must start with its label {example.label!r}, starts with {example.completion[:12]!r}"
            )
        prompt = self.prompt_tokens(example.prompt)
        rest = example.completion[len(example.label) :]
        completion = self.label_tokens[LABELS.index(example.label)] + (self._encode(rest) if rest else [])
        if self.tokenizer.eos_token_id is not None:
            completion.append(self.tokenizer.eos_token_id)
        index = LABELS.index(example.label)
        return TokenizedCase(prompt + completion, len(prompt), index, len(self.label_tokens[index]))


def tokenize_split(fmt: ChatFormat, examples: list[Example], path: str, max_len: int) -> list[TokenizedCase]:
    """Tokenise a split; a case over ``max_len`` tokens or not starting with its label is an error naming its line."""
    cases = []
    for line, example in enumerate(examples, start=1):
        try:
            case = fmt.case(example)
        except ValueError as bad:
            raise DataError(path, line, "completion", str(bad)) from None
        if len(case.tokens) > max_len:
            raise DataError(
                path,
                line,
                "prompt",
                f"{len(case.tokens)} tokens with the completion, above train.max_seq_length="
                f"{max_len}; shorten the case or raise the limit (nothing is truncated)",
            )
        cases.append(case)
    return cases


def label_log_probs(model: nn.Module, fmt: ChatFormat, prompt: str, copies: int = 1) -> mx.array:
    """Log-probability of each label completion given the prompt: shape (copies, 3).

    The prompt runs once as a batch of ``copies`` identical rows; multi-token
    labels continue from its cache. With dropout on, each row is one
    MC-dropout sample that scores all three labels with the same dropout mask.
    """
    cache = make_prompt_cache(model)
    prompt_ids = mx.array([fmt.prompt_tokens(prompt)] * copies)
    return _score_labels_after(model, fmt, prompt_ids, cache)


@dataclass(frozen=True)
class SharedPrefix:
    """The tokens every prompt of a set starts with, and the model's cache (one row) after them."""

    tokens: tuple[int, ...]
    cache: list | None


def prefix_cache(model: nn.Module, tokens: mx.array, frozen: FrozenPrefix | None = None) -> list | None:
    """The model's cache after running ``tokens`` (shape (1, P)) as one row; None for no tokens.

    Differentiable and lazy: training calls it inside the loss, so gradients
    reach the adapted layers through the prefix's keys and values. With
    ``frozen`` (recorded from these tokens) the frozen blocks are replayed, not run.
    """
    if not tokens.size:
        return None
    if frozen and tokens.shape[1] != len(frozen.tokens):
        raise ValueError(
            f"the batch shares {tokens.shape[1]} prefix tokens, the recorded prefix "
            f"{len(frozen.tokens)}; record it from the same cases"
        )
    cache = make_prompt_cache(model)
    with frozen.replayed(model) if frozen else nullcontext():
        hidden_states(model, tokens, cache)
    return cache


def common_prefix(prompts: list[list[int]]) -> list[int]:
    """The tokens all ``prompts`` start with, leaving each prompt at least its last token.

    That token's hidden state predicts the label, so it has to be computed per prompt.
    """
    return commonprefix(prompts)[: min(map(len, prompts)) - 1]  # works on lists of tokens too


def shared_prefix(model: nn.Module, prompts: list[list[int]]) -> SharedPrefix:
    """Run the tokens all ``prompts`` start with through the model once.

    With a chat template and fixed instructions that is most of a prompt (76 of
    ~125 tokens for SmolLM2 and the study's data).
    """
    common = common_prefix(prompts)
    cache = prefix_cache(model, mx.array([common], mx.int32))
    if cache:
        mx.eval(cache_arrays(cache))
    return SharedPrefix(tuple(common), cache)


def hidden_after_prefix(model: nn.Module, rows: mx.array, cache: list | None) -> mx.array:
    """Hidden states of ``rows`` (right-padded), each continuing the one-row prefix held in ``cache``.

    Every row attends to the prefix's keys and values at the positions after it;
    ``cache`` itself is left as it was. No cache: a plain forward pass.
    """
    return hidden_states(model, rows, fork_cache(cache, rows.shape[0]) if cache else None)


def batch_label_log_probs(
    model: nn.Module, fmt: ChatFormat, prompts: list[list[int]], prefix: SharedPrefix | None = None
) -> mx.array:
    """``label_log_probs`` of several tokenised prompts in one forward pass: shape (len(prompts), 3)."""
    scores = fanned_label_log_probs(model, fmt, prompts, prefix)
    if scores.shape[0] != 1:
        raise ValueError("the model fans its rows out (MC dropout); use fanned_label_log_probs")
    return scores[0]


def fanned_label_log_probs(
    model: nn.Module, fmt: ChatFormat, prompts: list[list[int]], prefix: SharedPrefix | None = None
) -> mx.array:
    """Label log-probabilities of tokenised prompts, shape (copies, len(prompts), 3).

    ``copies`` is how many output rows the model makes of each input row: 1,
    or inside ``triage.model.blocks.shared_lower_blocks`` one per MC
    sample. The rows are each prompt after the shared ``prefix`` (its cache is
    reused, not recomputed), followed by a label's tokens but the last; labels
    of one token share their prompt's row. Rows are right-padded: the padding
    comes after every real token, so causal attention keeps it out of each
    score, and all rows share the prefix's positions.
    """
    prefix = prefix or SharedPrefix((), None)
    skip = len(prefix.tokens)
    if any(tuple(prompt[:skip]) != prefix.tokens or len(prompt) <= skip for prompt in prompts):
        raise ValueError("every prompt must start with the shared prefix and go on after it")
    continuations = sorted({tuple(ids[:-1]) for ids in fmt.label_tokens})
    rows = [prompt[skip:] + list(tail) for prompt in prompts for tail in continuations]
    width = max(map(len, rows))
    hidden = hidden_after_prefix(model, mx.array([row + [0] * (width - len(row)) for row in rows]), prefix.cache)
    copies = hidden.shape[0] // len(rows)
    # One pick per label token: the row holding its label's prefix, the position predicting it.
    row_of, position, target, slot = [], [], [], []
    for i, prompt in enumerate(prompts):
        for j, ids in enumerate(fmt.label_tokens):
            row = i * len(continuations) + continuations.index(tuple(ids[:-1]))
            for k, token in enumerate(ids):
                row_of.append(row)
                position.append(len(prompt) - skip - 1 + k)
                target.append(token)
                slot.append(i * len(fmt.label_tokens) + j)
    # Input row r comes out as rows r * copies ... r * copies + copies - 1.
    out_rows = mx.array(row_of)[None, :] * copies + mx.arange(copies)[:, None]
    picked = hidden[out_rows, mx.array(position)[None, :]]  # (copies, picks, hidden)
    logprobs = nn.log_softmax(project(model, picked).astype(mx.float32), axis=-1)
    targets = mx.broadcast_to(mx.array(target)[None, :, None], (copies, len(target), 1))
    token_scores = mx.take_along_axis(logprobs, targets, axis=-1)[..., 0]
    scores = mx.zeros((len(prompts) * len(fmt.label_tokens), copies)).at[mx.array(slot)].add(token_scores.T)
    return scores.T.reshape(copies, len(prompts), len(fmt.label_tokens))


def _score_labels_after(model: nn.Module, fmt: ChatFormat, prompt_ids: mx.array, cache: list) -> mx.array:
    """Run the prompt rows into ``cache``, then score each label's tokens after them; (rows out, 3)."""
    rows = prompt_ids.shape[0]
    last = hidden_states(model, prompt_ids, cache)[:, -1:, :]
    first = nn.log_softmax(project(model, last)[:, 0, :].astype(mx.float32), axis=-1)
    scores = []
    for ids in fmt.label_tokens:
        score = first[:, ids[0]]
        if len(ids) > 1:
            rest = mx.array([ids] * rows)
            hidden = hidden_states(model, rest[:, :-1], cache)
            logprobs = nn.log_softmax(project(model, hidden).astype(mx.float32), axis=-1)
            score = score + mx.take_along_axis(logprobs, rest[:, 1:, None], axis=-1).sum(axis=(1, 2))
            for layer_cache in cache:
                layer_cache.trim(len(ids) - 1)
        scores.append(score)
    return mx.stack(scores, axis=1)
