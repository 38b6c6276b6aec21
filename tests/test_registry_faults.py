"""Registry faults (issue 16): a full disk while a version is saved, a damaged registry, and
a version swap in the middle of a /predict batch. Tiny real models, the real app."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import add_reward_version
from test_protocol import make_client, pairwise_task, predict

from ml_backend.cli import main as cli
from training.registry import Registry, RegistryWriteError


@pytest.fixture
def two_versions(settings, tiny_reward_backbone_dir):
    """reward v1 then v2 promoted, as two trainings would leave them."""
    add_reward_version(settings, tiny_reward_backbone_dir)
    add_reward_version(settings, tiny_reward_backbone_dir)
    registry = Registry(settings.registry_dir)
    assert registry.current("reward").name == "v2"
    return registry


def _damage(registry: Registry, how: str) -> None:
    v2 = registry.root / "reward" / "v2"
    if how == "missing folder":
        shutil.rmtree(v2)
    elif how == "no weights":
        for weights in v2.glob("*.safetensors"):
            weights.unlink()
    elif how == "bad metadata":
        (v2 / "metadata.json").write_text('{"kind": "reward", "vers')
    elif how == "metadata not an object":
        (v2 / "metadata.json").write_text("[1, 2]")


DAMAGE = ["missing folder", "no weights", "bad metadata", "metadata not an object"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_current_version_serves_the_last_good_one_and_health_says_why(
    settings, two_versions, how, monkeypatch, capsys
):
    _damage(two_versions, how)
    assert two_versions.current("reward").name == "v1"  # the version promoted before v2
    assert [v.name for v in two_versions.versions("reward")] == ["v1"]

    client, _ = make_client(settings)
    health = client.get("/health").get_json()
    assert health["models"] == "loaded" and health["model_version"] == "policy-base+reward-v1"
    problems = " | ".join(health["registry"])
    assert "reward/CURRENT names 'v2'" in problems and "serving reward-v1" in problems
    assert str(settings.home) not in json.dumps(health)
    if how != "missing folder":
        assert "reward-v2 is damaged" in problems
    response = predict(client, [pairwise_task(1)])
    assert response.status_code == 200
    assert response.get_json()["results"][0]["model_version"] == "policy-base+reward-v1"
    # Pinning the damaged version is refused with what is wrong; the good one can be pinned.
    refused = client.post("/versions", json={"kind": "reward", "version": "v2"})
    assert refused.status_code == 404 and "v2" in refused.get_json()["error"]
    assert str(settings.home) not in refused.get_json()["error"]

    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    assert cli(["versions", "list", "--kind", "reward"]) == 0
    listed = capsys.readouterr().out
    assert "* reward-v1" in listed
    assert "CURRENT names 'v2'" in listed
    if how != "missing folder":
        assert "reward-v2" in listed and "damaged" in listed


def test_a_pointer_to_garbage_without_history_falls_back_to_the_newest_intact(
    settings, two_versions
):
    (two_versions.root / "reward" / "PROMOTED").unlink()  # a registry from before the history
    (two_versions.root / "reward" / "CURRENT").write_text("v9\n")
    assert two_versions.current("reward").name == "v2"
    (two_versions.root / "reward" / "CURRENT").write_text("not a version\n")
    assert two_versions.current("reward").name == "v2"
    assert any("'not a version'" in p for p in two_versions.problems())


def test_a_backend_serving_a_version_that_gets_damaged_goes_back_to_the_last_good(
    settings, two_versions
):
    client, app = make_client(settings)
    holder = app.extensions["ls_rlhf"].holder
    assert holder.model_version == "policy-base+reward-v2"
    _damage(two_versions, "no weights")
    assert holder.refresh_if_changed()  # what the version watcher does every 2 s
    assert client.get("/health").get_json()["model_version"] == "policy-base+reward-v1"


def _save_version(registry: Registry, backbone_dir) -> None:
    from training.models import load_sequence_classifier

    model, tokenizer = load_sequence_classifier(str(backbone_dir))
    with registry.stage("reward") as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        registry.commit("reward", staged, {"note": "the one the disk had no room for"}, True)


def _assert_nothing_partial(registry: Registry) -> None:
    assert [v.name for v in registry.versions("reward")] == ["v1", "v2"]
    assert registry.damaged("reward") == {}
    assert (registry.root / "reward" / "CURRENT").read_text() == "v2\n"
    assert sorted(p.name for p in (registry.root / "reward").iterdir()) == [
        "CURRENT",
        "PROMOTED",
        "v1",
        "v2",
    ]


def test_a_failing_metadata_write_leaves_no_partial_version(
    settings, two_versions, tiny_reward_backbone_dir, monkeypatch
):
    """The weights are written, then the disk is full for metadata.json (injected)."""
    import training.registry as registry_module

    def full(path, data):
        path.write_text('{"half": ')  # what a full disk leaves: the start of the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry_module, "_write_json", full)
    with pytest.raises(RegistryWriteError) as raised:
        _save_version(two_versions, tiny_reward_backbone_dir)
    message = str(raised.value)
    assert "No space left on device" in message and "served reward version is unchanged" in message
    assert str(settings.home) not in message
    _assert_nothing_partial(two_versions)


TMPFS_SCRIPT = textwrap.dedent(
    """
    import json, os, shutil, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_registry_faults import _save_version
    from training.registry import Registry, RegistryWriteError

    source, mount = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.copytree(source, mount / "registry")
    registry = Registry(mount / "registry")
    # Fill the small disk, leaving less room than one tiny version needs.
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(mount / "filler", "wb") as out:
        out.write(b"0" * max(0, free - 64 * 1024))
    result = {"free_before": os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize}
    try:
        _save_version(registry, sys.argv[4])
        result["error"] = None
    except RegistryWriteError as err:
        result["error"] = str(err)
    result["versions"] = [v.name for v in registry.versions("reward")]
    result["damaged"] = registry.damaged("reward")
    result["current"] = (registry.root / "reward" / "CURRENT").read_text()
    result["entries"] = sorted(p.name for p in (registry.root / "reward").iterdir())
    print(json.dumps(result))
    """
)


def test_a_full_tmpfs_while_a_version_is_saved_leaves_no_partial_version(
    settings, two_versions, tiny_reward_backbone_dir, tmp_path
):
    """A real small disk: a 24 MB tmpfs in a user and mount namespace of our own."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare here to mount a small tmpfs")
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode()[:200]}")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(TMPFS_SCRIPT)
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    command = (
        f"mount -t tmpfs -o size=24m tmpfs {mount} && exec {sys.executable} {script} "
        f"{two_versions.root} {mount} {tests_dir} {tiny_reward_backbone_dir}"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["free_before"] < 200 * 1024
    assert result["error"] and "No space left on device" in result["error"]
    assert "served reward version is unchanged" in result["error"]
    assert result["versions"] == ["v1", "v2"] and result["damaged"] == {}
    assert result["current"] == "v2\n"
    assert result["entries"] == ["CURRENT", "PROMOTED", "v1", "v2"]  # no staging folder left


def test_a_version_swap_during_a_predict_batch_never_mixes_versions(
    settings, two_versions, monkeypatch
):
    """Five tasks in batches of one; after the first batch v1 is promoted and loaded."""
    from ml_backend.backend import RLHFBackend

    settings = settings.replace(generation_batch_size=1)
    client, app = make_client(settings)
    holder = app.extensions["ls_rlhf"].holder
    assert holder.model_version == "policy-base+reward-v2"
    original = RLHFBackend._predict_batch
    batches = []

    def swap_after_first(self, batch, schema, served):
        items = original(self, batch, schema, served)
        batches.append([item["model_version"] for item in items])
        if len(batches) == 1:
            two_versions.promote("reward", "v1")
            assert holder.refresh()  # swapped now, while this request is mid-batch
            assert holder.model_version == "policy-base+reward-v1"
        return items

    monkeypatch.setattr(RLHFBackend, "_predict_batch", swap_after_first)
    response = predict(client, [pairwise_task(i) for i in range(5)])
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(batches) == 5
    versions = {item["model_version"] for item in results}
    assert versions == {"policy-base+reward-v2"}, versions
    # The scores shown to the annotator name their reward model: all v2, none v1.
    shown = json.dumps([item.get("result") for item in results])
    assert shown.count("Reward (reward-v2)") == 5 and "reward-v1" not in shown
    # The next request gets the new version, whole.
    after = predict(client, [pairwise_task(i) for i in range(3)]).get_json()["results"]
    assert {item["model_version"] for item in after} == {"policy-base+reward-v1"}
