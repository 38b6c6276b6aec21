"""Property-based fuzzing of every route (issue 16), against the real app on tiny real models.

Thousands of generated requests go through Flask's test client over the app `create_app`
builds (the same app gunicorn serves), with auth off and on; a smaller run goes over real
HTTP to the gunicorn backend. For every answer: never a 5xx; every error is JSON with
"error" (what is wrong and what to do) and "field" (what it is about) and names no server
folder; a refused request records nothing (no event, job, connected project or version
change); and valid requests are still served afterwards. `bench/fuzz.py` runs the same
properties for longer and counts the outcomes (docs/reliability.md).
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import label_configs

# Hypothesis keeps caches and examples in ./.hypothesis by default: not in the repository.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "ls-rlhf-hypothesis"))

AUTH_USER, AUTH_PASSWORD, WEBHOOK_SECRET = "fuzz", "fuzz-pw", "fuzz-hook"
GOOD_AUTH = "Basic " + base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
ROUTES = [
    ("GET", "/"),
    ("GET", "/health"),
    ("POST", "/setup"),
    ("POST", "/predict"),
    ("GET", "/predictions/progress"),
    ("POST", "/webhook"),
    ("GET", "/versions"),
    ("POST", "/versions"),
    ("POST", "/train"),
    ("GET", "/jobs"),
    ("GET", "/jobs/1"),
    ("GET", "/metrics"),
]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
# Fields that name a part of the request rather than a JSON field.
REQUEST_PARTS = {
    "body",
    "path",
    "method",
    "Authorization",
    "request",
    "models",
    "job_id",
    "version",
}
CONFIGS = {name: label_configs.load(name) for name in ("pairwise", "ranking", "demonstration")}

# -- strategies ---------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
project_ids = st.one_of(
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=-5, max_value=0),
    st.integers(min_value=2**63 - 2, max_value=2**80),
    st.sampled_from(["3", "3.1700000000", "1.abc", "x", "", "-1", "٣", "1e3", " 2"]),
    st.builds(lambda i: {"id": i}, st.integers(min_value=-2, max_value=60)),
    json_values,
)
texts = st.one_of(
    st.text(max_size=60), st.sampled_from(["What is the capital of France?", "Paris.", ""])
)


def maybe(value_strategy, other=json_values):
    """Mostly a plausible value, sometimes anything, sometimes absent (None)."""
    return st.one_of(value_strategy, value_strategy, other, st.none())


@st.composite
def pairwise_data(draw):
    data = {
        "prompt": draw(maybe(texts)),
        "answer1": draw(maybe(texts)),
        "answer2": draw(maybe(texts)),
    }
    return {k: v for k, v in data.items() if v is not None}


@st.composite
def ranking_data(draw):
    item = st.fixed_dictionaries(
        {"id": maybe(st.sampled_from(["a1", "a2", "a3"])), "body": maybe(texts)}
    )
    items = draw(maybe(st.lists(maybe(item), max_size=4)))
    data: dict[str, Any] = {"prompt": draw(maybe(texts))}
    if items is not None:
        data["items"] = items
    return data


@st.composite
def tasks(draw):
    data = draw(st.one_of(pairwise_data(), ranking_data(), json_values))
    task: dict[str, Any] = {"id": draw(maybe(st.integers(min_value=1, max_value=10**6)))}
    if draw(st.integers(min_value=0, max_value=9)):  # one in ten has no "data"
        task["data"] = data
    return draw(st.one_of(st.just(task), st.just(task), json_values))


@st.composite
def predict_bodies(draw):
    body: dict[str, Any] = {
        "tasks": draw(maybe(st.lists(tasks(), max_size=6))),
        "label_config": draw(
            maybe(st.sampled_from([*CONFIGS.values(), "<View>", "<View><Text name='p'"]))
        ),
        "project": draw(maybe(project_ids)),
        "params": draw(maybe(st.fixed_dictionaries({"context": maybe(json_values)}))),
    }
    return {k: v for k, v in body.items() if v is not None or draw(st.booleans())}


actions = st.one_of(
    st.sampled_from(
        ["ANNOTATION_CREATED", "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED"]
    ),
    json_values,
)


@st.composite
def webhook_bodies(draw):
    ids = st.builds(lambda i: {"id": i}, maybe(st.integers(min_value=-3, max_value=10**4)))
    body = {
        "action": draw(maybe(actions)),
        "project": draw(maybe(project_ids)),
        "task": draw(maybe(ids)),
        "annotation": draw(maybe(st.one_of(ids, st.lists(ids, max_size=3)))),
    }
    return {k: v for k, v in body.items() if v is not None}


@st.composite
def setup_bodies(draw):
    extra = st.one_of(
        st.fixed_dictionaries({"reward_version": maybe(st.sampled_from(["v1", "v2", "v9"]))}),
        st.sampled_from(['{"reward_version": "v1"}', "{bad", "", "null", "[]"]),
    )
    body = {
        "project": draw(maybe(project_ids)),
        "schema": draw(maybe(st.sampled_from([*CONFIGS.values(), "<View/>", "<oops"]))),
        "extra_params": draw(maybe(extra)),
        "hostname": draw(maybe(st.just("http://127.0.0.1:1"))),
        "access_token": draw(maybe(st.just("token"))),
    }
    return {k: v for k, v in body.items() if v is not None}


versions_bodies = st.fixed_dictionaries(
    {},
    optional={
        "kind": maybe(st.sampled_from(["reward", "policy", "critic"])),
        "version": maybe(st.sampled_from(["v1", "v2", "../v1", "v1\x00"])),
    },
)


@st.composite
def valid_predict_bodies(draw):
    config = draw(st.sampled_from(sorted(CONFIGS)))
    prompt = draw(st.text(min_size=1, max_size=40).filter(str.strip))
    answers = draw(st.lists(st.text(max_size=40), min_size=3, max_size=3))
    if config == "ranking":
        items = [{"id": f"a{i}", "title": f"Answer {i}", "body": a} for i, a in enumerate(answers)]
        data: dict[str, Any] = {"prompt": prompt, "items": items}
    else:
        data = {"prompt": prompt, "answer1": answers[0], "answer2": answers[1]}
    n = draw(st.integers(min_value=1, max_value=3))
    tasks = [{"id": i + 1, "data": dict(data)} for i in range(n)]
    return {"tasks": tasks, "label_config": CONFIGS[config], "project": draw(st.integers(1, 40))}


@st.composite
def valid_webhook_bodies(draw):
    action = draw(st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "START_TRAINING"]))
    body: dict[str, Any] = {"action": action, "project": {"id": draw(st.integers(1, 40))}}
    if action != "START_TRAINING":
        body["annotation"] = {"id": draw(st.integers(1, 10**6))}
        body["task"] = {"id": draw(st.integers(1, 10**6))}
    return body


@st.composite
def mutated(draw, valid):
    """A valid body, or one with a single field (top level or inside the first task's
    data) replaced by any JSON value or removed: the near misses a user sends."""
    body = draw(valid)
    if draw(st.booleans()):
        return body
    target = body
    if "tasks" in body and draw(st.booleans()):
        target = body["tasks"][0]["data"] if draw(st.booleans()) else body["tasks"][0]
    key = draw(st.sampled_from(sorted(target)))
    if draw(st.booleans()):
        del target[key]
    else:
        target[key] = draw(json_values)
    return body


bodies_by_path = {
    "/predict": st.one_of(predict_bodies(), mutated(valid_predict_bodies())),
    "/webhook": st.one_of(webhook_bodies(), mutated(valid_webhook_bodies())),
    "/setup": setup_bodies(),
    "/versions": versions_bodies,
    "/train": st.fixed_dictionaries({}, optional={"project": project_ids}),
}


@st.composite
def raw_bodies(draw, path: str):
    """The bytes of a request body: mostly JSON of a plausible shape, else anything."""
    kind = draw(st.sampled_from(["shaped", "shaped", "shaped", "json", "bytes", "empty", "deep"]))
    if kind == "shaped":
        return json.dumps(draw(bodies_by_path.get(path, json_values))).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.integers(min_value=50, max_value=5000))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    return b""


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@st.composite
def requests_for(draw, route: tuple[str, str] | None = None, auth_mode: str = "off"):
    if route is None:
        method = draw(st.sampled_from(METHODS))
        path = draw(
            st.one_of(
                st.sampled_from([p for _, p in ROUTES]),
                st.sampled_from(
                    ["/jobs/abc", "/jobs/" + "9" * 23, "/jobs/-1", "/nope", "/predict/"]
                ),
                # A path, not "//host/...": Flask's test client reads that as a host name.
                st.text(alphabet="/abcjobs0123456789%.-_", max_size=20).map(
                    lambda s: "/" + s.lstrip("/")
                ),
            )
        )
    else:
        method, path = route
        path = (
            draw(st.sampled_from([path, path]))
            if not path.startswith("/jobs/")
            else draw(st.sampled_from(["/jobs/1", "/jobs/abc", "/jobs/" + "9" * 23, "/jobs/0"]))
        )
    body = (
        draw(raw_bodies(path)) if method in ("POST", "PUT", "PATCH") or draw(st.booleans()) else b""
    )
    headers = {
        "Content-Type": draw(
            st.sampled_from(
                [
                    "application/json",
                    "application/json",
                    "text/plain",
                    "",
                    "application/x-www-form-urlencoded",
                ]
            )
        )
    }
    if auth_mode == "on":
        choice = draw(
            st.sampled_from(["good", "good", "bad", "garbage", "none", "secret", "bad-secret"])
        )
        if choice == "good":
            headers["Authorization"] = GOOD_AUTH
        elif choice == "bad":
            headers["Authorization"] = "Basic " + base64.b64encode(b"fuzz:nope").decode()
        elif choice == "garbage":
            headers["Authorization"] = draw(st.text(alphabet="Basic =%!abc", max_size=30))
        elif choice == "secret":
            headers["X-LS-RLHF-Secret"] = WEBHOOK_SECRET
        elif choice == "bad-secret":
            headers["X-LS-RLHF-Secret"] = draw(st.text(alphabet="abc-", max_size=12))
    if draw(st.booleans()):
        headers["X-" + draw(st.text(alphabet="abcdef", min_size=1, max_size=8))] = draw(
            st.text(alphabet="abc 123;=", max_size=40)
        )
    # Header values as HTTP clients send them: no surrounding whitespace.
    return Request(method, path, body, {k: v.strip() for k, v in headers.items() if v.strip()})


# -- what is recorded ------------------------------------------------------------------------


def recorded_state(home: Path) -> tuple:
    """Everything a request could record: events, jobs, connected projects, CURRENT pointers."""
    state = home / "state"

    def count(db: str, table: str) -> int:
        with sqlite3.connect(state / db) as conn:
            try:
                return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            except sqlite3.OperationalError:
                return 0

    pointers = tuple(
        (p.read_text() if p.is_file() else None)
        for p in (home / "registry" / kind / "CURRENT" for kind in ("policy", "reward"))
    )
    return (
        count("events.sqlite3", "events"),
        count("jobs.sqlite3", "jobs"),
        count("events.sqlite3", "projects"),
        pointers,
    )


def check_answer(request: Request, status: int, mimetype: str, body: bytes, home: Path) -> None:
    """The properties every answer must have; AssertionError says which one failed."""
    assert status < 500, f"{status} for {request}: {body[:300]!r}"
    if request.method == "HEAD" or status < 400:
        return
    assert mimetype == "application/json", f"{status} {mimetype} for {request}: {body[:200]!r}"
    answer = json.loads(body)
    message, named = answer.get("error"), answer.get("field")
    assert isinstance(message, str) and len(message) >= 20, answer
    assert isinstance(named, str) and named, answer
    assert "Traceback" not in message and str(home) not in message, answer
    assert str(Path(home).resolve()) not in message, answer
    if named not in REQUEST_PARTS:
        last = named.rsplit(".", 1)[-1].split("[", 1)[0]
        assert last in message, answer


def changed_only_if_accepted(request: Request, status: int, before: tuple, after: tuple) -> None:
    """A refused request records nothing; an accepted one only what its route records."""
    if status >= 400 or request.method != "POST":
        assert before == after, f"{status} for {request} changed {before} -> {after}"
        return
    if request.path not in ("/webhook", "/train"):
        assert before[:2] == after[:2], f"{request} recorded events or jobs"
    if request.path in ("/webhook", "/train") and status == 201:
        assert after[0] == before[0] + 1, (
            f"{request}: one event recorded, not {after[0] - before[0]}"
        )


# -- the app ---------------------------------------------------------------------------------


@dataclass
class Target:
    client: Any
    home: Path
    outcomes: Counter = field(default_factory=Counter)

    def send(self, request: Request) -> int:
        before = recorded_state(self.home)
        response = self.client.open(
            request.path, method=request.method, data=request.body, headers=request.headers
        )
        after = recorded_state(self.home)
        check_answer(
            request, response.status_code, response.mimetype, response.get_data(), self.home
        )
        changed_only_if_accepted(request, response.status_code, before, after)
        self.outcomes[response.status_code] += 1
        return response.status_code


def build_target(base_settings, home: Path, reward_backbone: Path, auth: bool) -> Target:
    from conftest import add_reward_version

    from ml_backend.app import create_app
    from ml_backend.serving import ModelHolder

    settings = base_settings.replace(
        home=home,
        max_request_bytes=20_000,
        max_predict_tasks=4,
        train_every=2,
        **(
            {
                "basic_auth_user": AUTH_USER,
                "basic_auth_password": AUTH_PASSWORD,
                "webhook_secret": WEBHOOK_SECRET,
            }
            if auth
            else {}
        ),
    )
    add_reward_version(settings, reward_backbone)
    holder = ModelHolder(settings)
    holder.refresh()
    # The worker stays off: a job queued by a fuzzed event must not train meanwhile.
    app = create_app(settings, holder=holder, load_models=False, start_worker=False)
    return Target(app.test_client(), home)


@pytest.fixture(scope="module")
def targets(tmp_path_factory, tiny_policy_dir, tiny_reward_backbone_dir):
    from training.settings import Settings

    base = Settings(
        home=tmp_path_factory.mktemp("unused"),
        policy_model=str(tiny_policy_dir),
        reward_backbone=str(tiny_reward_backbone_dir),
        max_new_tokens=4,
        num_completions=2,
    )
    built = {
        mode: build_target(
            base, tmp_path_factory.mktemp(f"fuzz-{mode}"), tiny_reward_backbone_dir, mode == "on"
        )
        for mode in ("off", "on")
    }
    yield built
    for mode, target in built.items():
        print(f"fuzz outcomes, auth {mode}: {dict(sorted(target.outcomes.items()))}")


def assert_still_serving(target: Target, auth: bool) -> None:
    headers = {"Authorization": GOOD_AUTH} if auth else {}
    pairwise = {
        "id": 1,
        "data": {"prompt": "Capital of France?", "answer1": "Paris.", "answer2": "Rome."},
    }
    answer = target.client.post(
        "/predict",
        json={"tasks": [pairwise], "label_config": CONFIGS["pairwise"], "project": 1},
        headers=headers,
    )
    assert answer.status_code == 200, answer.get_json()
    (item,) = answer.get_json()["results"]
    assert item["model_version"] == "policy-base+reward-v1" and 0 < item["score"] < 1
    event = target.client.post(
        "/webhook",
        json={"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"id": 5}},
        headers=headers,
    )
    assert event.status_code == 201
    assert target.client.get("/health", headers=headers).get_json()["models"] == "loaded"


def fuzz(examples: int, derandomize: bool = True) -> hsettings:
    return hsettings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )


# Per route: 150 requests with auth off and 50 with it on, plus 250 anywhere: 2,650.
PER_ROUTE, PER_ROUTE_AUTH, ANYWHERE = 150, 50, 250


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_survives_generated_requests(targets, route):
    target = targets["off"]

    # /predict runs the models: fewer of those (it is also fuzzed by the test of any path).
    @fuzz(PER_ROUTE if route[1] != "/predict" else PER_ROUTE * 2 // 3)
    @given(requests_for(route))
    def run(request):
        target.send(request)

    run()
    assert_still_serving(target, auth=False)


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_survives_generated_requests_with_auth_on(targets, route):
    target = targets["on"]

    @fuzz(PER_ROUTE_AUTH)
    @given(requests_for(route, auth_mode="on"))
    def run(request):
        status = target.send(request)
        authorized = request.headers.get("Authorization") == GOOD_AUTH or (
            request.path == "/webhook" and request.headers.get("X-LS-RLHF-Secret") == WEBHOOK_SECRET
        )
        if not authorized:
            assert status == 401, (status, request)

    run()
    assert_still_serving(target, auth=True)


def test_any_method_on_any_path_survives(targets):
    target = targets["off"]

    @fuzz(ANYWHERE)
    @given(requests_for())
    def run(request):
        target.send(request)

    run()
    assert_still_serving(target, auth=False)


# -- over real HTTP, against the gunicorn backend ------------------------------------------

HTTP_EXAMPLES = 200


def test_the_gunicorn_backend_survives_generated_requests_over_http(
    settings, start_backend, tiny_reward_backbone_dir
):
    import requests
    from conftest import add_reward_version

    settings = settings.replace(max_request_bytes=20_000, max_predict_tasks=4)
    add_reward_version(settings, tiny_reward_backbone_dir)
    backend = start_backend(settings)
    session = requests.Session()
    outcomes: Counter = Counter()

    def send(request: Request) -> requests.Response:
        before = recorded_state(settings.home)
        response = session.request(
            request.method,
            backend.url + request.path,
            data=request.body,
            headers=request.headers,
            timeout=30,
        )
        after = recorded_state(settings.home)
        mimetype = response.headers.get("Content-Type", "").split(";")[0]
        check_answer(request, response.status_code, mimetype, response.content, settings.home)
        changed_only_if_accepted(request, response.status_code, before, after)
        outcomes[response.status_code] += 1
        return response

    @fuzz(HTTP_EXAMPLES)
    @given(st.one_of(requests_for(), *(requests_for(route) for route in ROUTES)))
    def run(request):
        send(request)

    run()

    # A chunked body (no Content-Length) over the limit is refused as it streams in.
    events_before = recorded_state(settings.home)[0]
    chunks = (
        b'{"action": "START_TRAINING", "project": 1, "pad": "' + b"x" * 5000 for _ in range(6)
    )
    response = session.post(
        f"{backend.url}/webhook",
        data=chunks,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413 and response.json()["field"] == "body", response.text[:300]
    assert recorded_state(settings.home)[0] == events_before
    print(f"fuzz outcomes over HTTP: {dict(sorted(outcomes.items()))}")
    target = Target(_HTTPClient(session, backend.url), settings.home)
    assert_still_serving(target, auth=False)


class _HTTPClient:
    """Just enough of Flask's test client over requests for `assert_still_serving`."""

    def __init__(self, session, url: str) -> None:
        self.session, self.url = session, url

    def post(self, path: str, json: Any = None, headers: dict | None = None):
        return _Answer(self.session.post(self.url + path, json=json, headers=headers, timeout=30))

    def get(self, path: str, headers: dict | None = None):
        return _Answer(self.session.get(self.url + path, headers=headers, timeout=30))


class _Answer:
    def __init__(self, response) -> None:
        self.status_code = response.status_code
        self._response = response

    def get_json(self) -> Any:
        return self._response.json()
