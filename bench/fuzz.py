"""Long fuzz run of every route: the properties of tests/test_hardening_fuzz.py, more requests.

The same generated requests (bodies, types, sizes, headers, methods, auth off and on) and
the same checks per answer (never a 5xx; every error JSON with "error" and "field" and no
server folder; nothing recorded for a refused request), against the real app built by
`create_app` on tiny real models through Flask's test client, then over real HTTP against
the gunicorn backend (`ls-rlhf serve`). After each route, valid requests must still be
served. Each route runs until its count or its first failure (Hypothesis shrinks it and the
failing request is printed); the counts of answers per status go to docs/reliability.md.

    nice -n 19 .venv/bin/python bench/fuzz.py [--per-route 2000] [--http 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import given, seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_hardening_fuzz import (  # noqa: E402
    GOOD_AUTH,
    ROUTES,
    WEBHOOK_SECRET,
    Request,
    Target,
    _HTTPClient,
    assert_still_serving,
    build_target,
    changed_only_if_accepted,
    check_answer,
    fuzz,
    recorded_state,
    requests_for,
)
from tiny_models import build_tiny_policy, build_tiny_reward_backbone  # noqa: E402

from training.settings import Settings  # noqa: E402


def run_route(target: Target, strategy, examples: int, seed_value: int, check=None) -> dict:
    """Fuzz one route; the outcome counts, and the failure if one was found."""
    before = Counter(target.outcomes)
    started = time.perf_counter()
    failure = None

    @seed(seed_value)
    @fuzz(examples, derandomize=False)
    @given(strategy)
    def run(request: Request) -> None:
        status = target.send(request)
        if check is not None:
            check(request, status)

    try:
        run()
    except Exception as err:  # noqa: BLE001 - a failure is the finding: record it, go on
        failure = f"{type(err).__name__}: {err}"[:2000]
        traceback.print_exc()
    counts = target.outcomes - before
    return {
        "requests": sum(counts.values()),
        "statuses": dict(sorted(counts.items())),
        "seconds": round(time.perf_counter() - started, 1),
        "failure": failure,
    }


def auth_check(request: Request, status: int) -> None:
    authorized = request.headers.get("Authorization") == GOOD_AUTH or (
        request.path == "/webhook" and request.headers.get("X-LS-RLHF-Secret") == WEBHOOK_SECRET
    )
    assert authorized or status == 401, (status, request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-route", type=int, default=2000, help="requests per route")
    parser.add_argument("--http", type=int, default=1000, help="requests over real HTTP")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "output" / "fuzz.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ls-rlhf-fuzz-"))
    policy = build_tiny_policy(work / "policy")
    backbone = build_tiny_reward_backbone(work / "reward")
    base = Settings(
        home=work / "unused",
        policy_model=str(policy),
        reward_backbone=str(backbone),
        max_new_tokens=4,
        num_completions=2,
    )
    rows = []
    for auth in (False, True):
        target = build_target(base, work / f"home-{'on' if auth else 'off'}", backbone, auth)
        per_route = args.per_route if not auth else max(1, args.per_route // 4)
        for route in [*ROUTES, None]:
            strategy = requests_for(route, auth_mode="on" if auth else "off")
            row = run_route(target, strategy, per_route, args.seed, auth_check if auth else None)
            assert_still_serving(target, auth=auth)
            row.update(
                route="any method, any path" if route is None else f"{route[0]} {route[1]}",
                auth=auth,
                transport="test client",
            )
            rows.append(row)
            print(json.dumps(row), flush=True)

    if args.http:
        rows.append(run_http(base, work, backbone, args.http, args.seed))
        print(json.dumps(rows[-1]), flush=True)

    total = Counter()
    for row in rows:
        total.update({int(k): v for k, v in row["statuses"].items()})
    summary = {
        "requests": sum(total.values()),
        "statuses": dict(sorted(total.items())),
        "failures": [r for r in rows if r["failure"]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print("\n| route | auth | transport | requests | statuses | seconds | failure |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        auth = "on" if r["auth"] else "off"
        failure = "none" if not r["failure"] else r["failure"][:80].replace("|", "/")
        print(
            f"| `{r['route']}` | {auth} | {r['transport']} | {r['requests']} | {statuses} "
            f"| {r['seconds']} | {failure} |"
        )
    print(
        f"\ntotal: {summary['requests']} requests, {summary['statuses']}, failures: {len(summary['failures'])}"
    )


def run_http(base: Settings, work: Path, backbone: Path, examples: int, seed_value: int) -> dict:
    import requests
    from conftest import add_reward_version

    from ml_backend.harness.backend_process import BackendServer

    settings = base.replace(home=work / "home-http", max_request_bytes=20_000, max_predict_tasks=4)
    add_reward_version(settings, backbone)
    server = BackendServer(settings, work / "backend.log", extra_env={"HF_HUB_OFFLINE": "1"})
    server.start(timeout=300)
    session = requests.Session()
    outcomes: Counter = Counter()
    failure = None
    started = time.perf_counter()

    @seed(seed_value)
    @fuzz(examples, derandomize=False)
    @given(st.one_of(requests_for(), *(requests_for(route) for route in ROUTES)))
    def run(request: Request) -> None:
        before = recorded_state(settings.home)
        response = session.request(
            request.method,
            server.url + request.path,
            data=request.body,
            headers=request.headers,
            timeout=60,
        )
        after = recorded_state(settings.home)
        mimetype = response.headers.get("Content-Type", "").split(";")[0]
        check_answer(request, response.status_code, mimetype, response.content, settings.home)
        changed_only_if_accepted(request, response.status_code, before, after)
        outcomes[response.status_code] += 1

    try:
        run()
        assert_still_serving(Target(_HTTPClient(session, server.url), settings.home), auth=False)
    except Exception as err:  # noqa: BLE001 - a failure is the finding
        failure = f"{type(err).__name__}: {err}"[:2000]
        traceback.print_exc()
    finally:
        server.stop()
    return {
        "route": "any route, any path",
        "auth": False,
        "transport": "HTTP (gunicorn)",
        "requests": sum(outcomes.values()),
        "statuses": dict(sorted(outcomes.items())),
        "seconds": round(time.perf_counter() - started, 1),
        "failure": failure,
    }


if __name__ == "__main__":
    main()
