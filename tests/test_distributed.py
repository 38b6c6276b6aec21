"""Training with several processes: `ls-rlhf train reward | dpo | sft` and PPO really run
under `accelerate launch` with two processes (gloo, on the CPU), against one process with
the same global batch.

What is compared, and why these tolerances:

* reward, DPO, SFT: the weights of the version written, after a few AdamW steps at a
  learning rate high enough (1e-3) that every step moves them measurably. Two processes
  with half the batch each and one process with the whole batch see the same examples in
  each step; what differs is the order of floating-point sums (the all-reduce, padding
  to each half's longest sequence), about 1e-7 relative in float32. The test allows a
  difference of 1% of the largest change that training made to any weight (measured: well
  under 0.1%); taking a wrong batch, the same examples in another order, or unsynchronized
  gradients, moves weights by about as much as training does.
* PPO: each process samples its own responses, so two runs cannot be compared weight for
  weight. What can be: on one fixed rollout, the first update's gradient with two
  processes (each its half) and with one (all of it) agree to 1e-5 of the gradient's
  largest entry (measured: under 1e-6); in a run of its own, the statistics every process
  reduces (score moments, KL coefficient, metrics) are identical across the processes while
  their sampled responses differ.

The models are the tiny ones with dropout set to 0: dropout's random masks depend on how a
batch is split, and would make one process and two differ by design.

The launcher is the documented one-node DDP config, docker/accelerate-ddp.yaml, with
--num_processes 2 and ACCELERATE_USE_CPU=1 (torchrun's launcher, CPU processes over gloo).
`accelerate launch --num_processes 2 --cpu` would start ONE process where MPI is not
installed (accelerate's multi-CPU launcher is mpirun; training/distributed.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"

PROMPTS = [f"Question {i}: what is {i} plus {i}?" for i in range(24)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_CONFIG = ROOT / "docker" / "accelerate-ddp.yaml"


def launcher(processes: int = 2) -> list[str]:
    """The command line that starts `processes` training processes on this machine: the
    documented one-node DDP config (on a machine without CUDA, ACCELERATE_USE_CPU=1 makes
    its processes CPU ones over gloo)."""
    return [
        str(ACCELERATE),
        "launch",
        f"--config_file={DDP_CONFIG}",
        f"--num_processes={processes}",
        f"--main_process_port={free_port()}",
    ]


def test_the_documented_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(DDP_CONFIG))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_machines == 1
    zero2 = load_config_from_file(str(ROOT / "docker" / "accelerate-zero2.yaml"))
    assert zero2.distributed_type == DistributedType.DEEPSPEED
    assert zero2.deepspeed_config["zero_stage"] == 2


def launch_env(home: Path, policy: Path, backbone: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "LS_RLHF_HOME": str(home),
        "LS_RLHF_POLICY_MODEL": str(policy),
        "LS_RLHF_REWARD_BACKBONE": str(backbone),
        # float32: bfloat16's rounding (8-bit mantissa) differs with how a batch is split
        "LS_RLHF_DTYPE": "float32",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def run_launched(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*launcher(), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def without_dropout(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key in list(config):
        if "dropout" in key or key.endswith("_pdrop"):
            config[key] = 0.0
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_policy_dir, tiny_reward_backbone_dir) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("no-dropout")
    return (
        without_dropout(tiny_policy_dir, folder / "policy"),
        without_dropout(tiny_reward_backbone_dir, folder / "reward"),
    )


def only_version(home: Path, kind: str) -> Path:
    versions = sorted(p.name for p in (home / "registry" / kind).glob("v*"))
    assert versions == ["v1"], f"expected exactly one {kind} version, found {versions}"
    leftovers = list((home / "registry" / kind).glob(".staging-*"))
    assert not leftovers, f"staging folders left behind: {leftovers}"
    return home / "registry" / kind / "v1"


def assert_same_training(one: Path, two: Path, start: Path, tolerance: float = 0.01) -> float:
    """The two versions' weights differ by under `tolerance` x the largest change training
    made to a weight; returns that ratio."""
    a, b, s = (load_file(p / "model.safetensors") for p in (one, two, start))
    moved = max((a[k] - s[k]).abs().max().item() for k in a if k in s)
    differ = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4, f"training barely moved the weights ({moved}): nothing to compare"
    print(
        f"one process vs two: weights differ by {differ:.3g}, {differ / moved:.2%} of the largest change ({moved:.3g})"
    )
    assert differ <= tolerance * moved, f"one process and two differ by {differ} (moved {moved})"
    return differ / moved


def in_process(args: list[str], home: Path, policy: Path, backbone: Path, monkeypatch) -> None:
    """The same command in this process: one process, the reference run."""
    from ml_backend.cli import main

    monkeypatch.setenv("LS_RLHF_HOME", str(home))
    monkeypatch.setenv("LS_RLHF_POLICY_MODEL", str(policy))
    monkeypatch.setenv("LS_RLHF_REWARD_BACKBONE", str(backbone))
    monkeypatch.setenv("LS_RLHF_DTYPE", "float32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def saved_dataset(path: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_train_reward_under_two_processes_matches_one(tmp_path, models, monkeypatch):
    policy, backbone = models
    pairs = saved_dataset(
        tmp_path / "pairs",
        [
            {"prompt": p, "chosen": f"The answer is {2 * i}.", "rejected": f"Maybe {i}, or not."}
            for i, p in enumerate(PROMPTS)
        ],
    )
    common = ["train", "reward", "--dataset", str(pairs), "--method", "finetune"]
    # 2 steps of 8 prompts: whole batches (21 training prompts; a ragged last batch would
    # hold 5 prompts in one process and 1 in the other, a mean of unequal means)
    common += ["--validation-fraction", "0", "--max-steps", "2", "--learning-rate", "1e-2"]
    common += ["--promote", "always"]
    done = run_launched(
        ["-m", "ml_backend.cli", *common, "--batch-size", "4"],
        launch_env(tmp_path / "two", policy, backbone),
    )
    # The main process alone speaks: one summary line, not one per process.
    assert done.stdout.count("reward-v1: held-out") == 1, done.stdout
    in_process([*common, "--batch-size", "8"], tmp_path / "one", policy, backbone, monkeypatch)
    two = only_version(tmp_path / "two", "reward")
    one = only_version(tmp_path / "one", "reward")
    assert_same_training(one, two, backbone)
    metrics = json.loads((two / "metadata.json").read_text())["metrics"]
    assert metrics["steps"] == 2
    assert metrics["accuracy_after"] == pytest.approx(
        json.loads((one / "metadata.json").read_text())["metrics"]["accuracy_after"]
    )


def test_train_dpo_and_sft_under_two_processes_match_one(tmp_path, models, monkeypatch):
    policy, backbone = models
    pairs = saved_dataset(
        tmp_path / "pairs",
        [
            {"prompt": p, "chosen": f"It is {2 * i}.", "rejected": "I do not know."}
            for i, p in enumerate(PROMPTS[:16])
        ],
    )
    examples = saved_dataset(
        tmp_path / "sft",
        # One completion for all: as many loss tokens in every example, so that a mean over
        # each process's tokens, averaged, is the mean over all (TRL's SFT loss is per token).
        [{"prompt": p, "completion": "It is done."} for p in PROMPTS[:16]],
    )
    for kind, data in (("dpo", pairs), ("sft", examples)):
        common = ["train", kind, "--dataset", str(data), "--max-steps", "3"]
        common += ["--learning-rate", "1e-3"]
        run_launched(
            ["-m", "ml_backend.cli", *common, "--batch-size", "2"],
            launch_env(tmp_path / f"{kind}-two", policy, backbone),
        )
        in_process(
            [*common, "--batch-size", "4"], tmp_path / f"{kind}-one", policy, backbone, monkeypatch
        )
        two = only_version(tmp_path / f"{kind}-two", "policy")
        one = only_version(tmp_path / f"{kind}-one", "policy")
        metadata = [json.loads((v / "metadata.json").read_text()) for v in (one, two)]
        assert metadata[1]["processes"] == 2
        # The loss of every process's batches, not the main process's alone.
        losses = [m["metrics"]["train_loss"] for m in metadata]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4), (kind, losses)
        assert_same_training(one, two, policy)


def test_ppo_under_two_processes_shards_rollouts_and_agrees_on_its_statistics(
    tmp_path, models, monkeypatch
):
    policy, _ = models
    sys.path.insert(0, str(Path(__file__).parent))
    from launched_ppo import first_update_gradients

    run_launched(
        [str(ROOT / "tests" / "launched_ppo.py"), str(policy), str(tmp_path)],
        launch_env(tmp_path / "home", policy, policy),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = first_update_gradients(str(policy))
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp_path / f"grads-2-{r}.pt") for r in (0, 1)]
    assert set(ranks[0]) == set(one)
    for name, gradient in one.items():
        scale = gradient.abs().max().item()
        for rank in ranks:
            # Synchronized: the same gradient in both processes, and the one-process one.
            assert torch.allclose(rank[name], gradient, rtol=0, atol=1e-5 * scale + 1e-12), name
    logs = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert logs[0]["sampled"] != logs[1]["sampled"]  # each process its own responses
    for key in ("kl_coef", "score_moments", "metrics", "version"):
        assert logs[0][key] == logs[1][key], key
    coefficients = logs[0]["kl_coef"]
    assert len(set(coefficients)) == len(coefficients)  # the controller moved every update
    count = logs[0]["score_moments"][0]
    assert count == 3 * 8  # every process's scores: 3 updates x the global batch of 8
    only_version(tmp_path, "policy")


def test_train_reward_auto_probes_on_the_main_process_and_fine_tunes_on_both(
    tmp_path, models, monkeypatch
):
    """`auto`: the linear probe is fitted by the main process alone (it reads each answer
    once, no gradient to share), the fine-tuning run by both; the comparison and the choice
    are one process's figures, the same as a one-process run's."""
    policy, backbone = models
    pairs = saved_dataset(
        tmp_path / "pairs",
        [
            {"prompt": f"Question {i}?", "chosen": f"Yes, {i} is right.", "rejected": "No idea."}
            for i in range(64)
        ],
    )
    common = ["train", "reward", "--dataset", str(pairs), "--method", "auto"]
    common += ["--validation-fraction", "0.3", "--max-steps", "2", "--promote", "always"]
    run_launched(
        ["-m", "ml_backend.cli", *common, "--batch-size", "4"],
        launch_env(tmp_path / "two", policy, backbone),
    )
    in_process([*common, "--batch-size", "8"], tmp_path / "one", policy, backbone, monkeypatch)
    auto = [
        json.loads((only_version(tmp_path / home, "reward") / "metadata.json").read_text())[
            "metrics"
        ]["auto"]
        for home in ("one", "two")
    ]
    assert auto[1]["probe_validation_loss"] == pytest.approx(auto[0]["probe_validation_loss"])
    assert auto[1]["finetune_validation_loss"] == pytest.approx(
        auto[0]["finetune_validation_loss"], rel=1e-3
    )
    assert auto[1]["chosen"] == auto[0]["chosen"]


@pytest.mark.label_studio
def test_a_job_trains_through_the_launcher_setting(
    settings, label_studio, make_project, ls_client, finegrained_path, monkeypatch
):
    """LS_RLHF_TRAINING_LAUNCHER: the job pulls the export here, its reward version and PPO
    step train in two launched processes (one version each, written by the main one, which
    reports progress back), and the next round of tasks is written from here."""
    from ml_backend.scheduler import Job
    from ml_backend.training_job import run_training
    from training.finegrained import load_finegrained, to_label_studio_tasks
    from training.registry import lineage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    settings = settings.replace(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        reward_method="finetune",
        loop_policy="ppo",
        loop_policy_updates=1,
        next_round=2,
        training_launcher=" ".join(launcher()),
    )
    project = make_project("pairwise")
    ls_client.projects.import_tasks(
        id=project.id,
        request=to_label_studio_tasks(load_finegrained(finegrained_path)[:4], "pairwise"),
    )
    before = len(list(ls_client.tasks.list(project=project.id)))
    job = Job(1, project.id, "running", "test", 0, 0.0, 0.0, None, 0.0, "", {}, 1)
    reported: list[str] = []
    metrics = run_training(settings, job, lambda fraction, message: reported.append(message))
    assert metrics["reward_version"] == "reward-v1", metrics
    assert metrics["policy_version"] == "policy-v1", metrics
    assert metrics["next_round_tasks"] == 2
    assert "training the reward model" in reported  # from the launched main process
    registry = lineage(settings.registry_dir, project.id)
    assert [v.name for v in registry.versions("reward")] == ["v1"]
    assert [v.name for v in registry.versions("policy")] == ["v1"]
    assert registry.get("policy", "v1").metadata["processes"] == 2
    assert len(list(ls_client.tasks.list(project=project.id))) == before + 2


def test_a_launcher_that_fails_says_what_happened(settings, monkeypatch):
    from ml_backend.scheduler import Job
    from ml_backend.training_job import launched_training

    job = Job(1, 1, "running", "test", 0, 0.0, 0.0, None, 0.0, "", {}, 1)
    broken = settings.replace(training_launcher=f"{sys.executable} -c 'import sys; sys.exit(3)'")
    with pytest.raises(RuntimeError, match="exited with 3"):
        launched_training(broken, job, [], "<View/>", lambda *_: None)
    missing = settings.replace(training_launcher="no-such-launcher-here")
    with pytest.raises(RuntimeError, match="could not start"):
        launched_training(missing, job, [], "<View/>", lambda *_: None)
