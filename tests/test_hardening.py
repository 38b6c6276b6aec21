"""Bad input against the real app (issue 16): limits, wrong types, JSON for every error,
nothing recorded for what is refused, no server paths in answers."""

from __future__ import annotations

import pytest
from conftest import add_reward_version
from test_protocol import make_client, pairwise_task, predict

import label_configs
from ml_backend.events import EventLog
from ml_backend.scheduler import JobStore


@pytest.fixture
def app_parts(settings):
    client, app = make_client(settings.replace(max_request_bytes=50_000, max_predict_tasks=5))
    return client, app, EventLog(settings.state_dir / "events.sqlite3")


def assert_error(response, status, field, *words):
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json", response.get_data(as_text=True)[:200]
    body = response.get_json()
    assert body["field"] == field, body
    for word in words:
        assert word in body["error"], body
    return body


def test_a_body_over_the_limit_is_a_json_413_and_not_recorded(app_parts):
    client, _, events = app_parts
    big = {"action": "ANNOTATION_CREATED", "project": 1, "pad": "x" * 60_000}
    assert_error(client.post("/webhook", json=big), 413, "body", "LS_RLHF_MAX_REQUEST_BYTES")
    assert_error(client.post("/predict", json=big), 413, "body")
    assert events.events() == []


def test_too_many_tasks_per_predict_is_a_413_that_says_to_batch(app_parts):
    client, _, _ = app_parts
    tasks = [pairwise_task(i) for i in range(6)]
    assert_error(predict(client, tasks), 413, "tasks", "LS_RLHF_MAX_PREDICT_TASKS", "smaller")
    assert predict(client, tasks[:5]).status_code == 200


@pytest.mark.parametrize(
    "project",
    ["x", -1, 0, True, 1.5, "1.abc", "", [], 10**22, "12345678901234567890123", {"id": "y"}],
)
def test_webhooks_for_invalid_project_ids_are_refused_and_not_recorded(app_parts, project):
    client, _, events = app_parts
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": project})
    field = "project.id" if isinstance(project, dict) else "project"
    assert_error(response, 400, field, "project id")
    assert events.events() == []


def test_a_webhook_without_a_project_or_with_a_bad_action_is_refused(app_parts):
    client, _, events = app_parts
    assert_error(client.post("/webhook", json={"action": "START_TRAINING"}), 400, "project")
    assert_error(client.post("/webhook", json={"action": 5, "project": 1}), 400, "action", "number")
    assert_error(client.post("/webhook", json={"action": "no such", "project": 1}), 400, "action")
    assert_error(
        client.post(
            "/webhook",
            json={"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"id": "7"}},
        ),
        400,
        "annotation.id",
    )
    assert events.events() == []


def test_events_of_a_project_that_never_connected_are_recorded_but_start_no_job(
    app_parts, settings
):
    client, _, events = app_parts
    answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 9}})
    assert answer.status_code == 201
    body = answer.get_json()
    assert body["job"] is None and "never connected" in body["note"]
    assert [e.project_id for e in events.events()] == [9]
    assert JobStore(settings.state_dir / "jobs.sqlite3").jobs() == []
    # Label Studio's /setup connects it; the button then queues a job.
    assert client.post("/setup", json={"project": "9.1700000000"}).status_code == 200
    queued = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 9}})
    assert isinstance(queued.get_json()["job"], int)


@pytest.mark.parametrize(
    ("method", "path", "status", "field"),
    [
        ("get", "/no/such/route", 404, "path"),
        ("get", "/jobs/abc", 404, "job_id"),
        ("get", "/jobs/" + "9" * 23, 404, "job_id"),
        ("get", "/jobs/0", 404, "job_id"),
        ("get", "/predict", 405, "method"),
        ("delete", "/health", 405, "method"),
        ("put", "/webhook", 405, "method"),
    ],
)
def test_unknown_routes_ids_and_methods_get_json(app_parts, method, path, status, field):
    client, _, _ = app_parts
    assert_error(getattr(client, method)(path), status, field)


def test_a_job_listing_filter_of_the_wrong_type_is_a_400(app_parts):
    client, _, _ = app_parts
    assert_error(client.get("/jobs?project=x"), 400, "project")
    assert_error(client.get("/jobs?project=" + "9" * 23), 400, "project")
    assert client.get("/jobs?project=3").get_json() == {"jobs": []}


def test_predict_reports_wrong_types_as_wrong_types(app_parts):
    client, _, _ = app_parts
    number = {"id": 3, "data": {"prompt": 42, "answer1": "a", "answer2": "b"}}
    assert_error(predict(client, [number]), 422, "tasks[0].data.prompt", "a number, not text")
    as_string = {"id": 4, "data": "What is the capital of France?"}
    assert_error(predict(client, [pairwise_task(1), as_string]), 422, "tasks[1].data", "string")
    assert_error(predict(client, [5]), 400, "tasks[0]", "a number")
    assert_error(predict(client, [{"id": [1], "data": {}}]), 400, "tasks[0].id")
    assert_error(predict(client, [pairwise_task(1)], params="x"), 400, "params")
    assert_error(predict(client, [pairwise_task(1)], project="x"), 400, "project")
    body = {"tasks": [pairwise_task(1)], "label_config": 5}
    assert_error(client.post("/predict", json=body), 400, "label_config", "a number")
    missing = {"id": 5, "data": {"question": "x"}}
    assert_error(predict(client, [missing]), 422, "tasks[0].data.prompt", "has no field 'prompt'")


def test_setup_with_wrongly_typed_fields_is_a_400_naming_each(app_parts):
    client, _, events = app_parts
    xml = label_configs.load("pairwise")
    reported = client.post("/setup", json={"project": "1.abc", "schema": 5, "extra_params": "{bad"})
    assert_error(reported, 400, "project")
    assert_error(client.post("/setup", json={"project": 1, "schema": 5}), 400, "schema", "number")
    assert_error(
        client.post("/setup", json={"project": 1, "schema": xml, "extra_params": "{bad"}),
        400,
        "extra_params",
        "JSON",
    )
    assert_error(
        client.post("/setup", json={"project": 1, "extra_params": [1]}), 400, "extra_params"
    )
    assert_error(
        client.post("/setup", json={"project": 1, "extra_params": {"reward_version": 2}}),
        400,
        "extra_params.reward_version",
    )
    # Nothing was connected by the refused calls.
    assert not events.is_connected(1)


def test_errors_name_no_server_folder(app_parts, settings, tiny_reward_backbone_dir):
    client, _, _ = app_parts
    add_reward_version(settings, tiny_reward_backbone_dir)
    for response in (
        client.post("/versions", json={"kind": "reward", "version": "v9"}),
        client.post("/setup", json={"project": 1, "extra_params": {"reward_version": "v9"}}),
    ):
        body = assert_error(response, 404, "version", "v9", "v1")
        assert str(settings.home) not in body["error"] and "/" not in body["error"]


def test_versions_post_checks_its_fields(app_parts):
    client, _, _ = app_parts
    assert_error(client.post("/versions", json={"kind": "critic", "version": "v1"}), 400, "kind")
    assert_error(client.post("/versions", json={"kind": "reward", "version": 2}), 400, "version")
    assert_error(client.post("/versions", data="[1", content_type="application/json"), 400, "body")
    assert client.post("/versions").status_code == 200  # an empty POST lists them


def test_a_failing_route_is_a_json_500_without_traceback_or_path(app_parts, settings, caplog):
    client, app, _ = app_parts
    secret_path = str(settings.home / "registry" / "reward")

    def boom():
        raise RuntimeError(f"disk trouble at {secret_path}")

    app.add_url_rule("/boom", view_func=boom)
    body = assert_error(client.get("/boom"), 500, "backend", "log")
    assert secret_path not in body["error"] and "Traceback" not in body["error"]
    assert "disk trouble" in caplog.text  # the log has it


def test_a_model_that_failed_to_load_is_reported_without_its_path(settings, tmp_path):
    from ml_backend.app import create_app
    from ml_backend.serving import ModelHolder

    missing = tmp_path / "no-such-model"
    broken = settings.replace(policy_model=str(missing))
    holder = ModelHolder(broken)
    holder._initial_load()
    assert holder.load_error and str(missing) in holder.load_error
    client = create_app(broken, holder=holder, load_models=False).test_client()
    health = client.get("/health").get_json()
    assert health["models"] == "failed" and str(tmp_path) not in health["error"]
    response = predict(client, [pairwise_task(1)])
    assert_error(response, 503, "models", "/health")


def test_lone_surrogates_and_non_utf8_bodies_are_400s(app_parts):
    client, _, events = app_parts
    raw = b'{"action": "START_TRAINING", "project": 1, "x": "\\ud800"}'
    assert_error(client.post("/webhook", data=raw, content_type="application/json"), 400, "body")
    bad_utf8 = b'{"action": "START_TRAINING", "project": 1, "x": "\xff"}'
    resp = client.post("/webhook", data=bad_utf8, content_type="application/json")
    assert_error(resp, 400, "body", "JSON")
    assert events.events() == []


def test_auth_errors_are_json(settings):
    client, _ = make_client(settings.replace(basic_auth_user="u", basic_auth_password="p"))
    assert_error(client.get("/health"), 401, "Authorization", "Basic auth")
    assert_error(client.get("/no/route"), 401, "Authorization")
