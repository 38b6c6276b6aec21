"""Batched generation of K completions per prompt.

All prompts of a call are sorted by length, padded on the left and sampled in batches
of `batch_size * num_completions` sequences: on a CPU one batched call is several times
faster than one call per prompt (see bench/generate.py). Prompts are rendered with the
tokenizer's chat template when it has one. Results come back in prompt order.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from training.engine import VLLMEngine

log = logging.getLogger(__name__)


def cut_note(max_new_tokens: int | None) -> str:
    """What the labeling UI shows under an answer the generation limit cut off."""
    limit = f"{max_new_tokens} tokens" if max_new_tokens else "the token limit"
    return f"(cut at {limit}: the length limit ended it, not the model)"


def cut_field(answer_field: str) -> str:
    """The task data field holding an answer's cut note (the configs show `$answer1_cut`)."""
    return f"{answer_field}_cut"


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the policy sees for a user prompt: its chat template, if it has one."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        assert isinstance(text, str)  # tokenize=False gives the text
        return text
    return prompt


@torch.inference_mode()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_completions: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    batch_size: int = 16,
    seed: int | None = None,
    min_new_tokens: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    engine: VLLMEngine | None = None,
    truncated: list[list[bool]] | None = None,
) -> list[list[str]]:
    """`num_completions` completions for each prompt, in prompt order.

    `on_batch(n)` is called after each batch with the number of prompts done, for
    progress reporting. A `truncated` list, when given, gets one list per prompt saying of
    each completion whether it was cut: it ran to `max_new_tokens` without an end-of-sequence
    token (so tasks can mark it). With an `engine` (training/engine.py) the vLLM server
    samples, and it must already serve `model`'s weights (VLLMEngine.serve_folder or
    serve_model): the prompts are rendered and tokenized, and the answers decoded, here.
    """
    if engine is not None:
        return _engine_completions(
            engine,
            tokenizer,
            prompts,
            num_completions,
            max_new_tokens,
            temperature,
            top_p,
            batch_size,
            seed,
            min_new_tokens,
            on_batch,
            truncated,
        )
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    sampling = temperature > 0
    results: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [render_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(
            model.device
        )
        options = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=None,
            num_return_sequences=num_completions,
            min_new_tokens=min_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            remove_invalid_values=True,  # non-finite logits are cleaned before sampling
        )
        try:
            # A causal LM: PreTrainedModel with GenerationMixin (PreTrainedModel alone has
            # no generate).
            output = cast(GenerationMixin, model).generate(**inputs, **options)
        except RuntimeError as err:
            # Loop jobs twice died here on "probability tensor contains either inf, nan or
            # element < 0" with a PPO-trained policy in bfloat16; the same weights, prompts
            # and seed sampled cleanly outside the job. One bad batch should not fail a
            # round: it is sampled again in float32, with the precision bfloat16 lacks.
            if "probability tensor" not in str(err) or model.dtype == torch.float32:
                raise
            log.warning("sampling in %s failed (%s); this batch again in float32", model.dtype, err)
            exact = copy.deepcopy(model).float()
            output = cast(GenerationMixin, exact).generate(**inputs, **options)
            del exact
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        cut = _cut_at_limit(new_tokens, model, tokenizer, max_new_tokens)
        for i in range(len(chunk)):
            results.append(
                [t.strip() for t in texts[i * num_completions : (i + 1) * num_completions]]
            )
            if truncated is not None:
                truncated.append(cut[i * num_completions : (i + 1) * num_completions])
        if on_batch:
            on_batch(len(results))
    return results


def _cut_at_limit(
    new_tokens: torch.Tensor,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
) -> list[bool]:
    """Per generated row: it is `max_new_tokens` long and holds no end-of-sequence token, so
    the limit, not the model, ended it. (Rows that ended earlier are padded after their EOS.)"""
    if new_tokens.shape[1] < max_new_tokens:
        return [False] * new_tokens.shape[0]
    eos = model.generation_config.eos_token_id
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    if not ids:
        return [True] * new_tokens.shape[0]
    ended = torch.isin(new_tokens, torch.tensor(sorted(ids), device=new_tokens.device))
    return [not bool(row) for row in ended.any(dim=1)]


def _engine_completions(
    engine: VLLMEngine,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_completions: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int | None,
    min_new_tokens: int | None,
    on_batch: Callable[[int], None] | None,
    truncated: list[list[bool]] | None,
) -> list[list[str]]:
    results: list[list[str]] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [
            tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in chunk
        ]
        sampled = engine.sample(
            ids,
            num_completions,
            max_new_tokens,
            temperature,
            top_p,
            seed=None if seed is None else seed + start * num_completions,
            min_new_tokens=min_new_tokens,
            stop_token_ids=[] if eos is None else [eos],
        )
        for answers in sampled:
            texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
            results.append([t.strip() for t in texts])
            if truncated is not None:
                truncated.append([len(a) >= max_new_tokens and eos not in a for a in answers])
        if on_batch:
            on_batch(len(results))
    return results
