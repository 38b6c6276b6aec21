"""Batched generation returns each prompt's own completions, in prompt order."""

from __future__ import annotations

import pytest

from training.generation import generate_completions, render_prompt
from training.models import load_causal_lm


def test_batched_greedy_matches_one_by_one_and_keeps_order(tiny_policy_dir):
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    prompts = [
        "a much longer prompt about the capital of France and the river",
        "hi",
        "water boils",
        "yes",
    ]
    done = []
    batched = generate_completions(
        model,
        tokenizer,
        prompts,
        num_completions=1,
        max_new_tokens=6,
        temperature=0,
        batch_size=3,
        on_batch=done.append,
    )
    one_by_one = [
        generate_completions(
            model, tokenizer, [p], num_completions=1, max_new_tokens=6, temperature=0
        )[0]
        for p in prompts
    ]
    assert batched == one_by_one
    assert done == [3, 4]


def test_k_completions_per_prompt_and_chat_template(tiny_policy_dir):
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    out = generate_completions(
        model, tokenizer, ["one", "two"], num_completions=3, max_new_tokens=4, seed=1
    )
    assert [len(c) for c in out] == [3, 3]
    assert render_prompt(tokenizer, "hello").endswith("<|im_start|>assistant\n")


def test_a_batch_bfloat16_cannot_sample_is_sampled_again_in_float32(tiny_policy_dir, caplog):
    import torch

    model, tokenizer = load_causal_lm(str(tiny_policy_dir), dtype="bfloat16")

    # A planted fault: in bfloat16 every logit is -inf, which no logits processor can turn
    # into a distribution; in float32 the model is itself.
    def broken_in_bfloat16(module, args, output):
        if output.logits.dtype == torch.bfloat16:
            output.logits = torch.full_like(output.logits, float("-inf"))
        return output

    model.register_forward_hook(broken_in_bfloat16)
    with pytest.raises(RuntimeError, match="probability tensor"):  # as transformers fails
        model.generate(
            **tokenizer(["hi"], return_tensors="pt"),
            do_sample=True,
            temperature=0.8,
            max_new_tokens=2,
            pad_token_id=tokenizer.pad_token_id,
            remove_invalid_values=True,
        )
    with caplog.at_level("WARNING", logger="training.generation"):
        answers = generate_completions(model, tokenizer, ["hi", "a question"], 2, 4, seed=0)
    assert [len(a) for a in answers] == [2, 2]
    assert "again in float32" in caplog.text
    assert model.dtype == torch.bfloat16  # the caller's model is left as it was
