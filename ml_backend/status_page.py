"""`GET /status`: the backend's own page, for a person to read at a glance.

Served versions, recent training jobs with their state, each reward version's held-out
accuracy (from its training) and live accuracy (from the latest `ls-rlhf report` that
measured it), and the reports' plots. It sits behind the same auth as every other route;
`/` and `/health` stay the JSON Label Studio expects.
"""

from __future__ import annotations

import json
import re
import time
from html import escape
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, current_app, send_from_directory

from training.quality import REPORTS_DIR
from training.registry import Registry, lineage, lineages

_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px }
table { border-collapse: collapse; margin: 0.5em 0 1.5em }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left }
td.n { text-align: right; font-variant-numeric: tabular-nums }
.state-done { color: #1e7b34 } .state-failed { color: #b00020 } .state-running { color: #a36b00 }
.plots img { max-width: 480px; margin: 0 1em 1em 0; border: 1px solid #ddd }
.muted { color: #777 }
"""


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else ""


def _reports(folder: Path) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(name, report JSON, PNG names) per report folder, newest first."""
    found: list[tuple[str, dict[str, Any], list[str]]] = []
    if not folder.is_dir():
        return found
    files = sorted(folder.glob("*/report.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and _SAFE.match(path.parent.name):
            pngs = sorted(p.name for p in path.parent.glob("*.png") if _SAFE.match(p.name))
            found.append((path.parent.name, data, pngs))
    return found


status = Blueprint("ls_rlhf_status", __name__)


def _reports_dir() -> Path:
    return current_app.extensions["ls_rlhf_parts"].settings.state_dir / REPORTS_DIR


@status.get("/status")
def status_page() -> Response:
    parts_ = current_app.extensions["ls_rlhf_parts"]  # what create_app built
    holder, store = parts_.holder, parts_.scheduler.store
    reports_dir = _reports_dir()
    reports = _reports(reports_dir)
    root = parts_.settings.registry_dir
    # Live accuracy per (lineage, version): a project's report measured its own lineage's
    # versions (ls-rlhf report), and every lineage numbers its versions from v1.
    live: dict[tuple[Path, str], tuple[Any, int, str]] = {}
    for name, data, _ in reports:  # newest report first: the first measurement wins
        project = data.get("project")
        where = lineage(root, project if isinstance(project, int) else None).root
        for row in data.get("versions") or []:
            if isinstance(row, dict) and row.get("live_accuracy") is not None:
                live.setdefault(
                    (where, str(row.get("version"))),
                    (row["live_accuracy"], int(row.get("fresh_pairs") or 0), name),
                )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ls-rlhf status</title>",
        f"<style>{STYLE}</style></head><body><h1>ls-rlhf backend</h1>",
    ]
    state = "loaded" if holder.ready else ("failed" if holder.load_error else "loading")
    served = holder.get(timeout=0.1) if holder.ready else None
    parts.append(
        f"<p>Models: <b>{escape(state)}</b>. Serving <b id='served'>"
        f"{escape(holder.model_version)}</b>"
        + (f" since {_when(served.loaded_at)}" if served else "")
        + ".</p>"
    )
    found = lineages(root)
    for owner, registry in found.items():
        suffix = "" if registry.root == holder.registry.root else f"-{owner}"
        if len(found) > 1:  # several projects: each lineage serves and is measured on its own
            title = f"project {owner}" if owner is not None else "the registry root"
            parts.append(
                f"<h2>{escape(title)}</h2><p>Serving <b id='served-{owner or 'root'}'>"
                f"{escape(holder.model_version_for(owner))}</b>.</p>"
            )
        parts += _versions_table(registry, live, suffix)

    parts.append(
        "<h2>Recent jobs</h2><table id='jobs'><tr><th>job</th><th>project</th>"
        "<th>state</th><th>progress</th><th>message</th><th>created</th></tr>"
    )
    jobs = store.jobs(None, limit=20)
    for job in jobs:
        parts.append(
            f"<tr><td>{job.id}</td><td>{job.project_id}</td>"
            f"<td class='state-{escape(job.state)}'>{escape(job.state)}</td>"
            f"<td class='n'>{job.progress * 100:.0f}%</td><td>{escape(job.message or '')}</td>"
            f"<td>{_when(job.created_at)}</td></tr>"
        )
    parts.append("</table>")
    if not jobs:
        parts.append("<p class='muted'>No training job yet.</p>")

    parts.append("<h2>Annotation quality reports</h2>")
    if not reports:
        parts.append(
            "<p class='muted'>No report yet: run <code>ls-rlhf report --project ID</code>.</p>"
        )
    for name, data, pngs in reports:
        headline = [
            ("annotations", data.get("annotations")),
            ("annotators", data.get("annotators")),
            ("equal to the suggestion", _fmt(data.get("suggestion_equal_share"))),
            (
                "agrees with majority, suggestion shown",
                _fmt(data.get("majority_agreement_shown")),
            ),
            ("... withheld", _fmt(data.get("majority_agreement_withheld"))),
        ]
        parts.append(f"<h3>{escape(name)}</h3><p>")
        parts.append("; ".join(f"{escape(k)}: {escape(str(v))}" for k, v in headline))
        parts.append("</p><div class='plots'>")
        parts += [f"<img src='/status/reports/{name}/{png}' alt='{escape(png)}'>" for png in pngs]
        parts.append("</div>")
    parts.append("</body></html>")
    return Response("".join(parts), mimetype="text/html")


@status.get("/status/reports/<name>/<filename>")
def status_plot(name: str, filename: str):
    if not (_SAFE.match(name) and _SAFE.match(filename) and filename.endswith(".png")):
        abort(404)
    return send_from_directory(_reports_dir() / name, filename, mimetype="image/png")


def _versions_table(
    registry: Registry, live: dict[tuple[Path, str], tuple[Any, int, str]], suffix: str
) -> list[str]:
    """A lineage's reward versions with held-out and live accuracy, and its policy versions."""
    current = registry.current("reward")
    parts = [
        f"<h3>Reward versions</h3><table id='versions{suffix}'><tr><th>version</th><th>made</th>"
        "<th>held-out accuracy</th><th>live accuracy</th><th>fresh pairs</th>"
        "<th>measured in</th></tr>"
    ]
    versions = registry.versions("reward")
    for version in reversed(versions):
        metrics = version.metadata.get("metrics") or {}
        accuracy, pairs, where = live.get((registry.root, version.label), (None, 0, ""))
        mark = " (served)" if current and current.name == version.name else ""
        parts.append(
            f"<tr><td>{escape(version.label)}{mark}</td>"
            f"<td>{escape(str(version.metadata.get('created_at', '')))}</td>"
            f"<td class='n'>{_fmt(metrics.get('accuracy_after'))}</td>"
            f"<td class='n'>{_fmt(accuracy)}</td><td class='n'>{pairs or ''}</td>"
            f"<td>{escape(where)}</td></tr>"
        )
    parts.append("</table>")
    if not versions:
        parts.append("<p class='muted'>No reward version yet.</p>")
    policies = registry.versions("policy")
    if policies:
        parts.append("<p>Policy versions: " + ", ".join(escape(v.label) for v in policies) + "</p>")
    return parts
