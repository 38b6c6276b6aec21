"""`ls-rlhf connect`: wire a Label Studio project to the backend in one command."""

from __future__ import annotations

import argparse
import base64

from ml_backend.cli import UserError
from ml_backend.sampling import turn_on_uncertainty_sampling
from training.label_config import read_schema
from training.label_studio_client import LabelStudioError, client, describe, get_project
from training.settings import Settings

WEBHOOK_ACTIONS = [
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATIONS_DELETED",
]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "connect",
        help="connect a Label Studio project to the backend (ML backend + webhook)",
        description="Connect the backend to a project as its ML backend (with Basic auth if the backend "
        "requires it) and, when LS_RLHF_WEBHOOK_SECRET is set, add a webhook for annotation events that "
        "carries the secret header. Optionally set the project's label config first.",
    )
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument(
        "--backend-url", required=True, help="the backend's URL as Label Studio reaches it"
    )
    parser.add_argument(
        "--config", help="also set the label config: a name in label_configs/ or an .xml file"
    )
    parser.add_argument("--title", default="ls-rlhf", help="name of the ML backend in Label Studio")
    parser.add_argument(
        "--keep-sampling",
        action="store_true",
        help='leave the project\'s task sampling as it is (default: "Uncertainty sampling", the '
        "least certain prediction first, on the version the backend serves)",
    )
    parser.add_argument("--url", help="Label Studio URL (default: LS_RLHF_LABEL_STUDIO_URL)")
    parser.add_argument(
        "--api-key", help="Label Studio API key (default: LS_RLHF_LABEL_STUDIO_API_KEY)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import label_configs

    settings = Settings.from_env()
    backend_url = args.backend_url.rstrip("/")
    try:
        ls = client(settings, args.url, args.api_key)
        project = get_project(ls, args.project)
    except LabelStudioError as err:
        raise UserError(str(err)) from None
    try:
        if args.config:
            xml = label_configs.load(args.config)
            read_schema(xml)
            ls.projects.update(id=args.project, label_config=xml)
            print(f"project {args.project}: label config set to {args.config}")
        else:
            read_schema(project.label_config)  # says what is missing before connecting
        auth = {}
        if settings.basic_auth_user:
            auth = {
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": settings.basic_auth_user,
                "basic_auth_pass": settings.basic_auth_password,
            }
        existing = [
            m for m in ls.ml.list(project=args.project) if (m.url or "").rstrip("/") == backend_url
        ]
        if existing:
            ls.ml.update(id=existing[0].id, project=args.project, url=backend_url, **auth)
            print(f"project {args.project}: ML backend {existing[0].id} updated")
        else:
            ml = ls.ml.create(
                project=args.project,
                url=backend_url,
                title=args.title,
                is_interactive=False,
                **auth,
            )
            print(f"project {args.project}: ML backend {ml.id} connected")
        _ensure_webhook(ls, args.project, f"{backend_url}/webhook", settings)
        print(
            turn_on_uncertainty_sampling(
                ls,
                args.project,
                _served_version(backend_url, settings, args.project),
                not args.keep_sampling,
            )
        )
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - SDK/HTTP errors become one clear line
        raise UserError(describe(err, f"project {args.project}")) from None
    return 0


def _served_version(backend_url: str, settings: Settings, project_id: int) -> str | None:
    """The model version the backend's predictions for the project carry (its lineage's, from
    /versions; not /health's, which is the root lineage's), or None while it loads (the backend
    then sets the project's version itself once it has predicted)."""
    import requests

    auth = (
        (settings.basic_auth_user, settings.basic_auth_password)
        if settings.basic_auth_user
        else None
    )
    try:
        answer = requests.get(
            f"{backend_url}/versions", params={"project": project_id}, auth=auth, timeout=10
        )
        answer.raise_for_status()
        return answer.json().get("served")
    except (requests.RequestException, ValueError):
        return None


def _ensure_webhook(ls, project_id: int, url: str, settings: Settings) -> None:
    """One webhook to the backend's /webhook that the backend accepts.

    Label Studio creates a webhook for every new ML backend by itself (all actions, no
    headers). A second one would deliver each event twice (counted twice towards the
    threshold), and one without credentials is refused by a backend with a secret or Basic
    auth; so the existing one is updated to carry the credentials instead.
    """
    from ml_backend.app import WEBHOOK_SECRET_HEADER

    headers: dict[str, str] = {}
    if settings.webhook_secret:
        headers = {WEBHOOK_SECRET_HEADER: settings.webhook_secret}
    elif settings.basic_auth_user:
        pair = f"{settings.basic_auth_user}:{settings.basic_auth_password}".encode()
        headers = {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
    fields = {
        "url": url,
        "send_payload": True,
        "send_for_all_actions": False,
        "actions": WEBHOOK_ACTIONS,
        "headers": headers,
        "is_active": True,
    }
    existing = [w for w in ls.webhooks.list(project=str(project_id)) if w.url == url]
    if existing:
        ls.webhooks.update(id=existing[0].id, **fields)
        for extra in existing[1:]:
            ls.webhooks.delete(id=extra.id)
    else:
        ls.webhooks.create(project=project_id, **fields)
    guard = (
        " with the shared secret"
        if settings.webhook_secret
        else " with Basic auth"
        if headers
        else ""
    )
    print(f"project {project_id}: webhook{guard} for {', '.join(WEBHOOK_ACTIONS)}")
