"""GET /status: served versions, recent jobs, held-out and live accuracy, the report's plots;
behind the backend's auth, and readable in headless Chromium."""

from __future__ import annotations

import base64
import threading

import pytest
from test_labeling_ui import CHROMIUM, CHROMIUM_ARGS
from test_quality_report import LABELS, VERSION, pairwise

from ml_backend.app import create_app
from ml_backend.serving import ModelHolder
from training.models import load_sequence_classifier
from training.quality import quality_report, write_report
from training.registry import Registry

USER, PASSWORD = "ops", "s3cret-pass"


def export_tasks() -> list[dict]:
    """An export as Label Studio gives it: three annotators on six tasks, after the version."""
    tasks = []
    for t, (sides, (shown, score)) in enumerate(LABELS):
        prediction = {"id": t, "created_at": "2030-01-01T00:00:00Z", "model_version": VERSION}
        prediction.update({"result": pairwise(shown), "score": score} if shown else {"result": []})
        tasks.append(
            {
                "id": t + 1,
                "data": {
                    "prompt": f"Question {t}?",
                    "answer1": f"first {t}",
                    "answer2": f"second {t}",
                },
                "predictions": [prediction],
                "annotations": [
                    {
                        "id": 10 * t + a,
                        "completed_by": a + 1,
                        "created_at": "2030-01-01T00:01:00Z",
                        "result": pairwise(side),
                    }
                    for a, side in enumerate(sides)
                ],
            }
        )
    return tasks


@pytest.fixture
def status_app(settings, tiny_reward_backbone_dir):
    import label_configs

    settings = settings.replace(basic_auth_user=USER, basic_auth_password=PASSWORD)
    registry = Registry(settings.registry_dir)
    model, tokenizer = load_sequence_classifier(str(tiny_reward_backbone_dir))
    with registry.stage("reward") as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        version = registry.commit(
            "reward", staged, {"metrics": {"accuracy_after": 0.61}}, promote=True
        )
    report = quality_report(export_tasks(), label_configs.load("pairwise"), 3, registry)
    write_report(report, settings.state_dir / "reports" / "project-3")
    holder = ModelHolder(settings)
    holder.refresh()
    app = create_app(settings, holder=holder, load_models=False)
    store = app.extensions["ls_rlhf_parts"].scheduler.store
    done = store.enqueue(3, "threshold", 1)
    store.finish(done.id, "done", "reward-v2 trained, held-out 0.640")
    store.enqueue(3, "threshold", 2)
    (live,) = [v.live_accuracy for v in report.versions]
    return app, version, live


def auth(user=USER, password=PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_status_page_shows_versions_jobs_and_plots(status_app):
    app, version, live = status_app
    client = app.test_client()
    assert client.get("/status").status_code == 401
    assert client.get("/status", headers=auth(password="wrong")).status_code == 401
    page = client.get("/status", headers=auth())
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert f"policy-base+{version.label}" in html
    assert f"{version.label} (served)" in html and "0.610" in html and f"{live:.3f}" in html
    assert "reward-v2 trained, held-out 0.640" in html and "state-done" in html
    assert "state-queued" in html
    for png in ("reliability.png", "annotators.png", "versions.png"):
        assert f"/status/reports/project-3/{png}" in html
        image = client.get(f"/status/reports/project-3/{png}", headers=auth())
        assert image.status_code == 200 and image.data[:4] == b"\x89PNG"
    assert client.get("/status/reports/project-3/reliability.png").status_code == 401
    assert client.get("/status/reports/project-3/report.json", headers=auth()).status_code == 404
    assert client.get("/status/reports/..%2F..%2Fjobs/x.png", headers=auth()).status_code == 404
    # What Label Studio reads is unchanged: JSON from / and /health.
    for path in ("/", "/health"):
        assert client.get(path, headers=auth()).get_json()["status"] == "UP"


@pytest.mark.browser
def test_status_page_in_chromium(status_app, output_dir):
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    app, version, _ = status_app
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            context = browser.new_context(
                http_credentials={"username": USER, "password": PASSWORD},
                viewport={"width": 1200, "height": 1600},
            )
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{server.server_port}/status")
            page.wait_for_load_state("networkidle")
            assert page.inner_text("#served") == f"policy-base+{version.label}"
            rows = page.locator("#jobs tr").all_inner_texts()
            assert len(rows) == 3 and "done" in rows[-1] and "queued" in rows[1]
            widths = page.evaluate("() => [...document.images].map(i => i.naturalWidth)")
            assert len(widths) == 3 and all(w > 100 for w in widths), widths
            page.screenshot(path=str(output_dir / "status.png"), full_page=True)
            browser.close()
    finally:
        server.shutdown()


def test_each_projects_lineage_has_its_own_versions_and_live_accuracy(
    status_app, settings, tiny_reward_backbone_dir
):
    """Two projects: project 3 owns the root, project 4 has its own reward-v1. Project 3's
    report measured the root's reward-v1; project 4's reward-v1 is another model and shows
    no live accuracy of its own."""
    import re

    from training.registry import lineage

    app, version, live = status_app
    (settings.registry_dir / "PROJECT").write_text("3\n")
    four = lineage(settings.registry_dir, 4, claim=True)
    model, tokenizer = load_sequence_classifier(str(tiny_reward_backbone_dir))
    with four.stage("reward") as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        four.commit("reward", staged, {"metrics": {"accuracy_after": 0.55}}, promote=True)
    html = app.test_client().get("/status", headers=auth()).get_data(as_text=True)
    assert "<h2>project 3</h2>" in html and "<h2>project 4</h2>" in html
    assert f"id='served-3'>policy-base+{version.label}<" in html
    assert "id='served-4'>policy-base+reward-v1<" in html

    def rows(table_id):
        table = html.split(f"id='{table_id}'", 1)[1].split("</table>", 1)[0]
        return re.findall(r"<tr><td>(.*?)</tr>", table)

    (mine,) = rows("versions")
    assert "0.610" in mine and f"{live:.3f}" in mine and "project-3" in mine
    (theirs,) = rows("versions-4")
    assert "0.550" in theirs and f"{live:.3f}" not in theirs and "project-3" not in theirs
