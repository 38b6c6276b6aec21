"""Label Studio's uncertainty sampling, kept on the version the backend serves.

On Label Studio 1.23 Community, a project whose `sampling` is "Uncertainty sampling" serves
annotators the tasks whose prediction has the lowest `score` first, but only predictions
whose `model_version` equals the project's `model_version` count; with none, it falls back
to random order. Label Studio refuses (400) a `model_version` that no prediction of the
project carries yet, so the project can only follow a new version once predictions of it
exist. `VersionFollower` does both halves: when a new version is served it asks Label
Studio to re-predict the unlabeled tasks (only for projects that sample by uncertainty),
and once predictions of the served version exist it sets the project's `model_version`.

With several projects each has its own lineage and so its own served version: each project
is watched, re-predicted and set by its own version, never by another project's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

UNCERTAINTY_SAMPLING = "Uncertainty sampling"


def _refused_model_version(err: Exception) -> bool:
    """Label Studio's 400 for a model_version that no prediction carries yet."""
    return getattr(err, "status_code", None) == 400 and "model_version" in str(
        getattr(err, "body", err)
    )


def set_model_version(ls: Any, project_id: int, model_version: str) -> bool:
    """Point the project at `model_version`; False if Label Studio has no prediction of it."""
    try:
        ls.projects.update(id=project_id, model_version=model_version)
    except Exception as err:
        if _refused_model_version(err):
            return False
        raise
    return True


def turn_on_uncertainty_sampling(
    ls: Any, project_id: int, model_version: str | None, sampling: bool = True
) -> str:
    """Set "Uncertainty sampling" (unless `sampling` is False) and the project's model version;
    returns one line saying what was set."""
    said = []
    if sampling:
        ls.projects.update(id=project_id, sampling=UNCERTAINTY_SAMPLING)
        said.append(f'sampling "{UNCERTAINTY_SAMPLING}"')
    else:
        said.append("sampling left as it was")
    if model_version:
        if set_model_version(ls, project_id, model_version):
            said.append(f"model version {model_version}")
        else:
            said.append(
                f"model version {model_version} once the backend's first predictions of it "
                "are in Label Studio (it refuses a version no prediction carries)"
            )
    return f"project {project_id}: " + ", ".join(said)


class VersionFollower:
    """Keeps each known project's `model_version` on the version the backend serves it.

    `client_for(project_id)` gives a Label Studio client (or None when the backend has no
    access); `served_version(project_id)` the version that project's lineage serves now
    (None while nothing is loaded). Work happens in background threads: the callers are
    request handlers.
    """

    def __init__(
        self,
        client_for: Callable[[int], Any | None],
        served_version: Callable[[int], str | None],
        delay: float = 1.0,
        attempts: int = 10,
    ) -> None:
        self.client_for = client_for
        self.served_version = served_version
        self.delay = delay
        self.attempts = attempts
        self.projects: set[int] = set()
        self.followed: dict[int, str] = {}  # project -> the model_version it was set to
        self._lock = threading.Lock()
        self._pending: set[tuple[int, str]] = set()

    def know(self, project_id: int) -> None:
        with self._lock:
            self.projects.add(project_id)

    def predictions_made(self, project_id: int | None, model_version: str) -> None:
        """The backend answered or delivered predictions of `model_version` for the project:
        Label Studio stores them after the answer, so the project is set a moment later."""
        if project_id is None:
            return
        self.know(project_id)
        with self._lock:
            if self.followed.get(project_id) == model_version:
                return
            if (project_id, model_version) in self._pending:
                return
            self._pending.add((project_id, model_version))
        threading.Thread(
            target=self._follow,
            args=(project_id, model_version),
            name=f"follow-version-{project_id}",
            daemon=True,
        ).start()

    def _follow(self, project_id: int, model_version: str) -> None:
        try:
            ls = self.client_for(project_id)
            if ls is None:
                return
            for attempt in range(self.attempts):
                time.sleep(self.delay * (1 + attempt))
                if set_model_version(ls, project_id, model_version):
                    with self._lock:
                        self.followed[project_id] = model_version
                    log.info("project %d: model version set to %s", project_id, model_version)
                    return
            log.warning(
                "project %d: Label Studio has no predictions of %s yet; its model version "
                "stays as it was",
                project_id,
                model_version,
            )
        except Exception as err:  # noqa: BLE001 - a background thread: log and go on
            log.warning(
                "project %d: setting the model version failed (%s)", project_id, type(err).__name__
            )
        finally:
            with self._lock:
                self._pending.discard((project_id, model_version))

    def version_changed(self, project_id: int, model_version: str) -> None:
        """The project's lineage serves a new version: if the project samples by uncertainty,
        its unlabeled tasks get predicted by it."""
        threading.Thread(
            target=self._repredict,
            args=(project_id, model_version),
            name=f"repredict-{project_id}",
            daemon=True,
        ).start()

    def _repredict(self, project_id: int, model_version: str) -> None:
        try:
            ls = self.client_for(project_id)
            if ls is None:
                return
            project = ls.projects.get(id=project_id)
            if getattr(project, "sampling", None) != UNCERTAINTY_SAMPLING:
                return
            todo = [t.id for t in ls.tasks.list(project=project_id) if not t.total_annotations]
            if not todo:
                return
            # Label Studio calls this backend's /predict inside this request and stores what it
            # answers; tasks answered later are posted by the backend itself.
            ls.actions.create(
                id="retrieve_tasks_predictions",
                project=project_id,
                selected_items={"all": False, "included": todo},
            )
            self.predictions_made(project_id, model_version)
        except Exception as err:  # noqa: BLE001 - a background thread: log and go on
            log.warning(
                "project %d: asking Label Studio for predictions of %s failed (%s)",
                project_id,
                model_version,
                type(err).__name__,
            )

    def watch(self, interval: float = 2.0) -> None:
        """Poll each known project's served version; call `version_changed` when one moves.
        A project's first sighting only records its version: the version it connected with
        is set through `predictions_made`."""

        def loop() -> None:
            last: dict[int, str] = {}
            while True:
                time.sleep(interval)
                with self._lock:
                    projects = sorted(self.projects)
                for project_id in projects:
                    try:
                        now = self.served_version(project_id)
                    except Exception as err:  # noqa: BLE001 - a damaged lineage: try again later
                        log.warning(
                            "project %d: reading its served version failed (%s)",
                            project_id,
                            type(err).__name__,
                        )
                        continue
                    if not now:
                        continue
                    before, last[project_id] = last.get(project_id), now
                    if before is not None and now != before:
                        self.version_changed(project_id, now)

        threading.Thread(target=loop, name="version-follower", daemon=True).start()
