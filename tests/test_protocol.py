"""The ML-backend protocol through Flask's test client, on tiny real models."""

from __future__ import annotations

import base64
import math

import pytest
from conftest import add_reward_version
from label_studio_sdk.label_interface import LabelInterface

import label_configs
from ml_backend.app import WEBHOOK_SECRET_HEADER, create_app
from ml_backend.serving import ModelHolder


def make_client(settings):
    holder = ModelHolder(settings)
    holder.refresh()  # load synchronously so tests do not race the background loader
    app = create_app(settings, holder=holder, load_models=False)
    return app.test_client(), app


@pytest.fixture
def client(settings):
    return make_client(settings)[0]


def pairwise_task(
    tid, prompt="What is the capital of France?", a="Paris is the capital.", b="I do not know."
):
    return {"id": tid, "data": {"prompt": prompt, "answer1": a, "answer2": b}}


def ranking_task(tid, answers=("Paris.", "Lyon is the capital.", "It is Paris, on the Seine.")):
    items = [
        {"id": f"a{i}", "title": f"Answer {i + 1}", "body": text} for i, text in enumerate(answers)
    ]
    return {"id": tid, "data": {"prompt": "What is the capital of France?", "items": items}}


def predict(client, tasks, config="pairwise", **extra):
    body = {
        "tasks": tasks,
        "label_config": label_configs.load(config),
        "project": "7.1700000000",
        **extra,
    }
    return client.post("/predict", json=body)


def test_health_and_setup_report_the_model_version(client):
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["models"] == "loaded"
    setup = client.post(
        "/setup", json={"project": "7.1700000000", "schema": label_configs.load("pairwise")}
    )
    assert setup.status_code == 200
    assert setup.get_json()["model_version"] == "policy-base+reward-none"


def test_setup_rejects_a_config_it_cannot_serve(client):
    response = client.post(
        "/setup", json={"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"}
    )
    assert response.status_code == 422
    assert "no RLHF control" in response.get_json()["error"]


def test_pairwise_without_reward_model_makes_up_nothing(client):
    response = predict(client, [pairwise_task(1), pairwise_task(2)])
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 2
    for item in results:
        assert item["model_version"] == "policy-base+reward-none"
        assert "score" not in item
        assert [r["type"] for r in item["result"]] == ["textarea"]
        assert "No reward model yet" in item["result"][0]["value"]["text"][0]


def test_pairwise_suggests_the_higher_reward_with_bradley_terry_score(
    settings, tiny_reward_backbone_dir
):
    version = add_reward_version(settings, tiny_reward_backbone_dir)
    client, app = make_client(settings)
    tasks = [
        pairwise_task(i, a=f"answer {i} one", b=f"another answer {i} two words") for i in range(5)
    ]
    items = predict(client, tasks).get_json()["results"]
    assert len(items) == 5
    holder = app.extensions["ls_rlhf"].holder
    interface = LabelInterface(label_configs.load("pairwise"))
    for task, item in zip(tasks, items, strict=True):
        assert item["model_version"] == f"policy-base+{version.label}"
        r1, r2 = holder.get().reward.score(
            [task["data"]["prompt"]] * 2, [task["data"]["answer1"], task["data"]["answer2"]]
        )
        choice = next(r for r in item["result"] if r["type"] == "pairwise")
        assert choice["value"]["selected"] == ("left" if r1 >= r2 else "right")
        assert item["score"] == pytest.approx(1 / (1 + math.exp(-abs(r1 - r2))), abs=1e-5)
        assert item["score"] >= 0.5
        shown = next(r for r in item["result"] if r["type"] == "textarea")["value"]["text"][0]
        assert f"{r1:+.3f}" in shown and f"{r2:+.3f}" in shown
        # The SDK's validator expects Pairwise's to_name to be an object tag, but the labeling
        # UI itself writes the tag's own name (see the protocol notes; the browser test checks
        # the UI renders it): validate everything else with the SDK.
        others = [r for r in item["result"] if r["type"] != "pairwise"]
        assert choice["to_name"] == choice["from_name"] == "comparison"
        assert interface.validate_prediction({"result": others}), others


def test_ranking_orders_by_reward_and_scores_the_closest_call(settings, tiny_reward_backbone_dir):
    add_reward_version(settings, tiny_reward_backbone_dir)
    client, app = make_client(settings)
    task = ranking_task(3)
    item = predict(client, [task], config="ranking").get_json()["results"][0]
    bodies = {it["id"]: it["body"] for it in task["data"]["items"]}
    rewards = (
        app.extensions["ls_rlhf"]
        .holder.get()
        .reward.score([task["data"]["prompt"]] * 3, list(bodies.values()))
    )
    by_id = dict(zip(bodies, rewards, strict=True))
    ranker = next(r for r in item["result"] if r["type"] == "ranker")
    order = ranker["value"]["ranker"]["rank"]
    assert order == sorted(by_id, key=by_id.get, reverse=True)
    gaps = [by_id[a] - by_id[b] for a, b in zip(order, order[1:], strict=False)]
    assert item["score"] == pytest.approx(1 / (1 + math.exp(-min(gaps))), abs=1e-5)
    assert LabelInterface(label_configs.load("ranking")).validate_prediction(
        {"result": item["result"]}
    )


def test_demonstration_prefills_the_answer_box_with_the_policy_draft(settings):
    from training.generation import generate_completions

    settings = settings.replace(temperature=0.0, max_new_tokens=8)  # greedy: drafts are known
    client, app = make_client(settings)
    prompts = [f"Say something about {w}" for w in ["cats", "dogs", "rain"]]
    tasks = [{"id": i, "data": {"prompt": p}} for i, p in enumerate(prompts)]
    items = predict(client, tasks, config="demonstration").get_json()["results"]
    served = app.extensions["ls_rlhf"].holder.get()
    expected = generate_completions(
        served.policy,
        served.tokenizer,
        prompts,
        num_completions=1,
        max_new_tokens=8,
        temperature=0.0,
        batch_size=len(prompts),
    )
    assert all(c[0] for c in expected)  # the tiny policy writes something for each prompt
    assert len(items) == 3
    for item, (draft,) in zip(items, expected, strict=True):
        (box,) = item["result"]
        assert (box["from_name"], box["to_name"], box["type"]) == ("answer", "prompt", "textarea")
        assert box["value"]["text"] == [draft]


def test_over_budget_answers_in_time_and_tracks_the_rest(settings):
    client, app = make_client(settings.replace(generation_batch_size=1, predict_budget_seconds=0.0))
    tasks = [{"id": i, "data": {"prompt": f"prompt {i}"}} for i in range(4)]
    items = predict(client, tasks, config="demonstration").get_json()["results"]
    assert len(items) == 4
    assert "result" in items[0] and all("result" not in item for item in items[1:])
    backend = app.extensions["ls_rlhf"]
    (job,) = backend.deliveries.values()
    import time

    deadline = time.time() + 30
    while job.state == "running" and time.time() < deadline:
        time.sleep(0.1)
    progress = client.get("/predictions/progress").get_json()["jobs"][0]
    assert progress["total"] == 3 and progress["done"] == 3
    # No Label Studio credentials here: the job says what to set instead of failing silently.
    assert progress["state"] == "failed" and "LS_RLHF_LABEL_STUDIO_API_KEY" in progress["error"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"tasks": [{"id": 5, "data": {"question": "x"}}]}, 422, "task 5: has no field 'prompt'"),
        (
            {"tasks": [{"id": 6, "data": {"prompt": "p", "answer1": "a"}}]},
            422,
            "task 6: has no field 'answer2'",
        ),
        (
            {"tasks": [{"id": 8, "data": {"prompt": "x" * 9000, "answer1": "a", "answer2": "b"}}]},
            422,
            "over the limit",
        ),
        ({"tasks": "not a list"}, 400, '"tasks" must be a list'),
        ({"tasks": [], "label_config": "<View><Text name='p' value='$p'"}, 422, "not valid XML"),
    ],
)
def test_bad_predict_input_gets_a_clear_4xx(client, body, status, message):
    body = {"label_config": label_configs.load("pairwise"), **body}
    response = client.post("/predict", json=body)
    assert response.status_code == status
    assert message in response.get_json()["error"]
    assert client.get("/health").status_code == 200


def test_malformed_json_is_refused_and_recorded_events_survive(client, settings):
    assert (
        client.post(
            "/webhook",
            json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": 2}},
        ).status_code
        == 201
    )
    response = client.post("/webhook", data="{not json", content_type="application/json")
    assert response.status_code == 400 and "JSON" in response.get_json()["error"]
    assert client.post("/predict", data="[1,", content_type="application/json").status_code == 400
    from ml_backend.events import EventLog

    (event,) = EventLog(settings.state_dir / "events.sqlite3").events()
    assert (event.action, event.project_id, event.annotation_ids) == ("ANNOTATION_CREATED", 2, (1,))


def test_webhook_records_label_studio_actions_without_the_payload(client, settings):
    payloads = [
        {
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": 11},
            "task": {"id": 3},
            "project": {"id": 4, "token": "s3cret"},
        },
        {
            "action": "ANNOTATIONS_CREATED",
            "annotation": [{"id": 12}, {"id": 13}],
            "project": {"id": 4},
        },
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 12}], "project": {"id": 4}},
        {"action": "START_TRAINING", "project": {"id": 4}},
    ]
    for payload in payloads:
        assert client.post("/webhook", json=payload).status_code == 201
    from ml_backend.events import EventLog

    log = EventLog(settings.state_dir / "events.sqlite3")
    events = log.events(project_id=4)
    assert [e.action for e in events] == [p["action"] for p in payloads]
    assert [e.annotation_ids for e in events] == [(11,), (12, 13), (12,), ()]
    assert b"s3cret" not in (settings.state_dir / "events.sqlite3").read_bytes()
    assert client.post("/webhook", json={"no": "action"}).status_code == 400


def test_basic_auth_guards_every_route_and_the_webhook_secret_works(settings):
    client, _ = make_client(
        settings.replace(basic_auth_user="ls", basic_auth_password="pw", webhook_secret="hook")
    )
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:nope").decode()}
    for method, path in [
        ("get", "/health"),
        ("post", "/setup"),
        ("post", "/predict"),
        ("get", "/versions"),
        ("get", "/metrics"),
    ]:
        assert getattr(client, method)(path, json={}).status_code == 401
        assert getattr(client, method)(path, json={}, headers=bad).status_code == 401
    assert client.get("/health", headers=good).status_code == 200
    event = {"action": "START_TRAINING", "project": {"id": 1}}
    assert client.post("/webhook", json=event).status_code == 401
    assert (
        client.post("/webhook", json=event, headers={WEBHOOK_SECRET_HEADER: "wrong"}).status_code
        == 401
    )
    assert (
        client.post("/webhook", json=event, headers={WEBHOOK_SECRET_HEADER: "hook"}).status_code
        == 201
    )
    assert client.post("/webhook", json=event, headers=good).status_code == 201


def test_versions_train_and_metrics(settings, tiny_reward_backbone_dir):
    client, _ = make_client(settings)
    assert client.get("/versions").get_json()["versions"] == ["policy-base+reward-none"]
    add_reward_version(settings, tiny_reward_backbone_dir)
    listing = client.post("/versions", json={}).get_json()
    assert (
        listing["current"] == {"policy": None, "reward": "reward-v1"}
        and "reward-v1" in listing["versions"]
    )
    assert client.post("/versions", json={"kind": "reward", "version": "v9"}).status_code == 404
    client.post("/setup", json={"project": "3.17"})  # Label Studio connects the project first
    job = client.post("/train", json={"project": "3.17"}).get_json()
    assert isinstance(job["job"], int)
    predict(client, [pairwise_task(1)])
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "ls_rlhf_predicted_tasks_total 1" in metrics
    assert "ls_rlhf_events_recorded_total 1" in metrics
