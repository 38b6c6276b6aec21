"""LS_RLHF_GENERATION_ENGINE=vllm against a real vLLM server (its own venv, loopback).

One server per session, on the tiny random GPT-2 in float32, so that its greedy answers
can be compared token for token with `generate` in this process. The server is shared:
each test gives it the weights it needs.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

import label_configs
from ml_backend.cli import main as cli
from ml_backend.harness.vllm_server import VLLMServer, VLLMStartError, find_vllm_python
from ml_backend.serving import Served
from ml_backend.tasks import make_tasks
from training.engine import VLLMEngine, engine_from_settings
from training.generation import render_prompt
from training.label_config import read_schema
from training.models import load_causal_lm
from training.ppo import PPOConfig, PPOTrainer

PROMPTS = ["What is the capital of France?", "Explain how plants make food.", "yes or no?"]


@pytest.fixture(scope="session")
def vllm_server(tiny_policy_dir, tmp_path_factory):
    try:
        find_vllm_python()
    except VLLMStartError as err:
        pytest.skip(f"vLLM is not installed here ({err})")
    server = VLLMServer(tiny_policy_dir, tmp_path_factory.mktemp("vllm"), dtype="float32")
    started = time.monotonic()
    server.start()
    print(f"vLLM started in {time.monotonic() - started:.0f} s")
    yield server
    server.stop()


@pytest.fixture
def engine(vllm_server, tmp_path) -> VLLMEngine:
    return VLLMEngine(vllm_server.url, tmp_path / "weights")


def engine_greedy(engine: VLLMEngine, tokenizer, n_tokens: int = 10) -> list[list[int]]:
    ids = [
        tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        for p in PROMPTS
    ]
    return [s[0] for s in engine.sample(ids, 1, n_tokens, temperature=0.0)]


@torch.no_grad()
def local_greedy(model, tokenizer, n_tokens: int = 10) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(
            render_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt"
        )["input_ids"]
        generated = model.generate(
            ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        row = generated[0, ids.shape[1] :].tolist()
        # generate stops at eos too; what it pads with after that is not an answer
        eos = tokenizer.eos_token_id
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def test_tasks_generated_through_vllm_are_well_formed(settings, vllm_server, tiny_policy_dir):
    settings = settings.replace(generation_engine="vllm", vllm_url=vllm_server.url)
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    served = Served(model, tokenizer, None, None, None, time.time())
    schema = read_schema(label_configs.load("pairwise"))
    tasks = make_tasks(PROMPTS, schema, served, settings)
    assert [t["prompt"] for t in tasks] == PROMPTS
    for task in tasks:
        assert task["policy_version"] and set(task) >= {"answer1", "answer2"}
        assert all(isinstance(task[f], str) for f in ("answer1", "answer2"))
    assert any(t["answer1"] != t["answer2"] for t in tasks)  # sampled, not copied
    # The server was given the base policy's folder, and sampling is seeded: the same again.
    engine = engine_from_settings(settings)
    assert engine is not None and engine.serving() == str(tiny_policy_dir.resolve())
    assert make_tasks(PROMPTS, schema, served, settings) == tasks


def test_the_server_samples_from_the_weights_it_was_last_given(engine, tiny_policy_dir):
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    engine.serve_folder(tiny_policy_dir, label="base")
    assert engine_greedy(engine, tokenizer) == local_greedy(model, tokenizer)

    changed = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    expected = local_greedy(changed, tokenizer)
    assert expected != local_greedy(model, tokenizer)  # else the test could not fail
    seconds = engine.serve_model(changed, label="changed")
    print(f"tiny policy saved and reloaded in {seconds:.2f} s")
    assert engine.serving() == "changed"
    assert engine_greedy(engine, tokenizer) == expected
    assert engine.serve_model(changed, label="changed") == 0.0  # already served: nothing done

    engine.serve_folder(tiny_policy_dir, label="base")  # and back
    assert engine_greedy(engine, tokenizer) == local_greedy(model, tokenizer)


def test_ppo_with_vllm_rollouts_completes_its_updates(engine, tiny_policy_dir):
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))

    def letter_e(prompts, texts):
        return [5 * t.count("e") / max(1, len(t)) for t in texts]

    config = PPOConfig(
        updates=2, batch_size=4, mini_batch_size=4, max_new_tokens=8, learning_rate=1e-3
    )
    trainer = PPOTrainer(model, tokenizer, letter_e, config, engine=engine)
    history = trainer.train(PROMPTS)
    assert len(history) == 2
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["time/engine_reload_seconds"] > 0  # each update's weights were sent
    assert history[-1]["objective/kl"] != 0  # the first update changed the policy
    # The server serves the weights of the last rollout, the policy after the first update.
    assert engine.serving() == f"ppo:{trainer._engine_run}:1"


def test_an_engine_that_does_not_answer_is_one_line_saying_how_to_start_it(
    settings, monkeypatch, capsys, tmp_path
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a prompt\n")
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LS_RLHF_GENERATION_ENGINE", "vllm")
    monkeypatch.setenv("LS_RLHF_VLLM_URL", "http://127.0.0.1:9")  # discard port: nothing there
    assert cli(["train", "ppo", "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no vLLM server answers at http://127.0.0.1:9" in err and "ls-rlhf vllm" in err
