"""The models a backend process serves, loaded once and swapped atomically.

A process holds one `Served` snapshot: policy, reward model (or none yet) and the model
version string Label Studio sees. Requests read the snapshot reference once and use it
throughout, so a swap never mixes two versions inside one request and never drops a
request in flight. `refresh()` notices a new "current" pointer in the registry (written
by training, possibly in another process), loads the new models outside any lock, then
replaces the reference in one assignment.

With several Label Studio projects, each project's lineage (training/registry.py,
`lineage`) has its own snapshot, loaded the first time the project asks; snapshots that
name the same version folder share its loaded model.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.models import load_causal_lm, resolve_policy
from training.registry import Registry, Version, lineage
from training.settings import Settings

log = logging.getLogger(__name__)

BASE_POLICY_LABEL = "policy-base"  # the policy before any training: settings.policy_model
NO_REWARD_LABEL = "reward-none"


def policy_label(policy: Version | None) -> str:
    """How a policy version appears in model versions and reports: 'policy-v2' or 'policy-base'."""
    return policy.label if policy else BASE_POLICY_LABEL


def model_version(policy: Version | None, reward: Version | None) -> str:
    """What Label Studio stores with each prediction, naming the models that made it:
    'policy-base+reward-v3'. Built here only."""
    return f"{policy_label(policy)}+{reward.label if reward else NO_REWARD_LABEL}"


@dataclass(frozen=True)
class Served:
    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    policy_version: Version | None
    reward: Any | None  # training.reward_model.RewardModel, once one is trained
    reward_version: Version | None
    loaded_at: float

    @property
    def model_version(self) -> str:
        """What Label Studio stores with each prediction: which models made it."""
        return model_version(self.policy_version, self.reward_version)


def model_version_of(registry: Registry) -> str:
    """The model version the registry's current pointers name, without loading anything."""
    return model_version(registry.current("policy"), registry.current("reward"))


class ModelHolder:
    """Loads the served models once per process and swaps them when versions change."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry_dir)  # the root lineage
        # One snapshot per lineage (keyed by its registry root); the root's is loaded first.
        self._snapshots: dict[Path, Served] = {}
        self._load_lock = threading.Lock()
        self._loaded = threading.Event()
        self.load_error: str | None = None
        # Torch inference from several request threads at once only thrashes 2 cores:
        # requests take turns on the model.
        self.compute_lock = threading.Lock()

    @property
    def _served(self) -> Served | None:
        return self._snapshots.get(self.registry.root)

    @property
    def ready(self) -> bool:
        return self._served is not None

    def registry_for(self, project: int | None, claim: bool = False) -> Registry:
        """The registry of the project's lineage (the root for None)."""
        if project is None:
            return self.registry
        return lineage(self.settings.registry_dir, project, claim=claim)

    def start_loading(self) -> None:
        """Load in a background thread so the server answers /health and /setup at once."""
        threading.Thread(target=self._initial_load, name="model-loader", daemon=True).start()

    def _initial_load(self) -> None:
        try:
            self.refresh()
        except Exception as err:
            self.load_error = f"{type(err).__name__}: {err}"
            log.exception("loading models failed")
        finally:
            self._loaded.set()

    def start_watching(self, interval: float = 2.0) -> None:
        """Poll the registry's pointers and swap models when training promotes a version."""

        def watch() -> None:
            self._loaded.wait()
            while True:
                time.sleep(interval)
                self.refresh_if_changed()

        threading.Thread(target=watch, name="version-watcher", daemon=True).start()

    def refresh_soon(self) -> None:
        threading.Thread(target=self.refresh_if_changed, name="model-refresh", daemon=True).start()

    def refresh_if_changed(self) -> bool:
        try:
            return self.refresh()
        except Exception:
            log.exception("loading the new version failed; still serving the previous one")
            return False

    def model_version_for(self, project: int | None = None) -> str:
        """The version a project's predictions carry now: its loaded snapshot's, else its
        registry's."""
        registry = self.registry_for(project)
        served = self._snapshots.get(registry.root)
        return served.model_version if served else model_version_of(registry)

    @property
    def model_version(self) -> str:
        """The version predictions carry now: the loaded snapshot's, else the registry's."""
        return self.model_version_for(None)

    def get(self, timeout: float | None = None, project: int | None = None) -> Served:
        """The current snapshot (of the project's lineage), waiting for the first load."""
        if self._served is None:
            if not self._loaded.wait(timeout):
                raise TimeoutError("models are still loading; try again in a few seconds")
            if self._served is None:
                raise RuntimeError(f"models failed to load: {self.load_error}")
        if project is None:
            return self._served
        registry = self.registry_for(project)
        served = self._snapshots.get(registry.root)
        if served is None:
            self._refresh_lineage(registry)  # this project's first request: load its versions
            served = self._snapshots[registry.root]
        return served

    def wanted_versions(
        self, registry: Registry | None = None
    ) -> tuple[Version | None, Version | None]:
        registry = registry or self.registry
        return registry.current("policy"), registry.current("reward")

    def problems(self) -> list[str]:
        """What is wrong in the registries of the lineages served, for /health."""
        lines = []
        for root in list(self._snapshots) or [self.registry.root]:
            prefix = "" if root == self.registry.root else f"project {root.name}: "
            lines += [prefix + line for line in Registry(root).problems()]
        return lines

    def refresh(self) -> bool:
        """Load whatever the registries name as current, where it differs; True if swapped."""
        swapped = self._refresh_lineage(self.registry)
        for root in list(self._snapshots):
            if root != self.registry.root:
                swapped = self._refresh_lineage(Registry(root)) or swapped
        return swapped

    def _refresh_lineage(self, registry: Registry) -> bool:
        with self._load_lock:
            policy_version, reward_version = self.wanted_versions(registry)
            served = self._snapshots.get(registry.root)
            if (
                served
                and _same(served.policy_version, policy_version)
                and _same(served.reward_version, reward_version)
            ):
                return False
            others = [s for s in self._snapshots.values() if s is not served]
            policy_from = next(
                (s for s in [served, *others] if s and _same(s.policy_version, policy_version)),
                None,
            )
            if policy_from:
                policy, tokenizer = policy_from.policy, policy_from.tokenizer
            else:
                policy, tokenizer = self._load_policy(policy_version)
            reward_from = next(
                (s for s in [served, *others] if s and _same(s.reward_version, reward_version)),
                None,
            )
            reward = reward_from.reward if reward_from else self._load_reward(reward_version)
            snapshot = Served(
                policy, tokenizer, policy_version, reward, reward_version, time.time()
            )
            self._snapshots[registry.root] = snapshot
            where = "" if registry.root == self.registry.root else f" for {registry.root.name}"
            log.info("serving %s%s", snapshot.model_version, where)
            return True

    def _load_policy(
        self, version: Version | None
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        path = (
            str(version.path)
            if version
            else resolve_policy(self.settings.policy_model, self.settings.models_cache_dir)
        )
        started = time.perf_counter()
        model, tokenizer = load_causal_lm(path, dtype=self.settings.dtype)
        log.info(
            "loaded policy %s in %.1f s",
            version.label if version else path,
            time.perf_counter() - started,
        )
        return model, tokenizer

    def _load_reward(self, version: Version | None) -> Any | None:
        if version is None:
            return None
        from training.reward_model import RewardModel

        started = time.perf_counter()
        model = RewardModel.load(version.path)
        log.info("loaded %s in %.1f s", version.label, time.perf_counter() - started)
        return model


def _same(a: Version | None, b: Version | None) -> bool:
    """The same version folder: v1 of two lineages is two versions."""
    return (a.path if a else None) == (b.path if b else None)
