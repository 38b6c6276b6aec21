"""Batched generation returns each prompt's own completions, in prompt order."""

from __future__ import annotations

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
