"""Live mode: push a batch written by ``select --format label-studio`` to a Label Studio server, pull
its finished annotations back as the JSON export that :func:`~xal_engine.exchange.label_studio.read_export`
reads. Uses label-studio-sdk (the ``labelstudio`` extra); imported only here.

- **Project**: named by title (created by :func:`push` with ``config.xml`` when no project has that
  title; two with the same title are refused) or by its numeric id (never created).
- **Images**: the PNGs a task names by a relative path (``images/<file>``) are uploaded to the server
  through its import API (multipart, ``commit_to_project=false``: stored as the project's file uploads,
  no task made of them), and the task's ``data.image`` becomes the served URL (``/data/upload/...``).
  Absolute URLs (``http(s)://``, ``/data/...``; ``select --image-url-prefix``) are kept as they are.
  So the server needs no access to this machine's disk, local or remote alike.
- **Tasks**: imported with their predictions; ``meta.xal_source`` keeps the task's original image path, and
  a task whose ``data.xal_id`` is already in the project is skipped (pushing a batch twice adds nothing).
- **Auth**: the API key goes to the sdk (legacy ``Token`` or personal access token, JWT); it never
  appears in a message. Every request is bounded by ``timeout_s`` and sent once (no retry: an import
  is not idempotent); the server unreachable, a refused key (401/403) and an unknown project end as
  :class:`~xal_engine.errors.XalError` (one line).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xal_engine.errors import XalError
from xal_engine.exchange.label_studio import CONFIG_XML, TASKS_JSON

ABSOLUTE_PREFIXES = ("http://", "https://", "/data/", "data:", "s3://", "gs://", "azure-blob://")
SERVED_PREFIX = "/data/"  # Label Studio's MEDIA_URL: uploads are served at /data/<file upload name>
UPLOAD_BATCH = 50  # files per multipart request (the server's DATA_UPLOAD_MAX_NUMBER_FILES is 100)


@dataclass(frozen=True)
class Server:
    """A Label Studio server and the API key to use it with (kept out of repr and messages)."""

    url: str
    token: str = field(repr=False)
    timeout_s: float = 10.0


@dataclass(frozen=True)
class PushSummary:
    project_id: int
    project_title: str
    created: bool  # the project was created by this push
    n_tasks: int  # tasks imported
    n_skipped: int  # tasks already in the project (same data.xal_id)
    n_uploaded: int  # images uploaded
    config_updated: bool  # an existing project's labelling config was replaced by config.xml


@dataclass(frozen=True)
class PullSummary:
    project_id: int
    project_title: str
    path: Path  # the JSON export written
    n_tasks: int  # annotated tasks in it
    n_annotations: int  # annotations in it (cancelled ones included: the import ignores them)


# ---------------------------------------------------------------------------------------- connection
def _detail(body: Any) -> str:
    """The server's reason in an error body, on one line and short."""
    if isinstance(body, dict):
        body = body.get("detail") or body.get("validation_errors") or body
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def _errors(server: Server, doing: str) -> Iterator[None]:
    """sdk and transport errors -> one-line XalError naming the server and what was being done."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as err:
        if err.status_code in (401, 403):
            raise XalError(f"Label Studio at {server.url} refused the API key ({err.status_code}) while "
                           f"{doing}: check LABEL_STUDIO_API_KEY or --token-file") from None
        raise XalError(f"Label Studio at {server.url} answered {err.status_code} while {doing}: "
                       f"{_detail(err.body)}") from None
    except httpx.TimeoutException:
        raise XalError(f"Label Studio at {server.url} did not answer within {server.timeout_s:g} s while "
                       f"{doing}") from None
    except httpx.HTTPError as err:  # refused connection, unknown host, broken transfer
        raise XalError(f"cannot reach Label Studio at {server.url} while {doing}: "
                       f"{' '.join(str(err).split()) or type(err).__name__}") from None


def _client(server: Server) -> Any:
    import httpx

    try:
        from label_studio_sdk import LabelStudio
    except ImportError:
        raise XalError("live mode needs label-studio-sdk: pip install 'xal-engine[labelstudio]'") from None
    if not server.url.startswith(("http://", "https://")):
        raise XalError(f"--url {server.url!r}: expected http://HOST:PORT or https://...")
    with _errors(server, "connecting"):
        return LabelStudio(base_url=server.url.rstrip("/"), api_key=server.token,
                           httpx_client=httpx.Client(timeout=server.timeout_s, follow_redirects=True),
                           timeout=server.timeout_s, max_retries=0)  # no silent re-POST of an import


def _raw(client: Any, path: str, method: str = "GET", **kwargs: Any) -> Any:
    """A request the sdk has no method for, through its own authenticated client; JSON back."""
    from label_studio_sdk.core.api_error import ApiError

    response = client._client_wrapper.httpx_client.request(path, method=method, **kwargs)
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if not 200 <= response.status_code < 300:
        raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=body)
    return body


# ------------------------------------------------------------------------------------------- project
def _find_project(client: Any, server: Server, project: str) -> Any | None:
    """The project named by id (digits) or exact title; None when no project has that title."""
    from label_studio_sdk.core.api_error import ApiError

    if project.isdigit():
        with _errors(server, f"reading project {project}"):
            try:
                return client.projects.get(int(project))
            except ApiError as err:
                if err.status_code == 404:
                    raise XalError(f"Label Studio at {server.url} has no project with id {project}") from None
                raise
    with _errors(server, "listing projects"):
        found = [p for p in client.projects.list(title=project, page_size=100) if p.title == project]
    if len(found) > 1:
        raise XalError(f"{len(found)} projects at {server.url} are titled {project!r} "
                       f"(ids {', '.join(str(p.id) for p in found)}): give --project ID")
    return found[0] if found else None


def _image_keys(config_xml: str, where: Path) -> list[str]:
    """The task data keys the labelling config shows as images (``<Image value="$key">``)."""
    try:
        root = ET.fromstring(config_xml)
    except ET.ParseError as err:
        raise XalError(f"{where}: not a labelling config (XML: {err})") from None
    return [e.get("value", "")[1:] for e in root.iter("Image") if e.get("value", "").startswith("$")]


# ---------------------------------------------------------------------------------------------- push
def _read_batch(tasks_dir: Path) -> tuple[str, list[dict[str, Any]], list[str]]:
    config_path, tasks_path = tasks_dir / CONFIG_XML, tasks_dir / TASKS_JSON
    for path in (config_path, tasks_path):
        if not path.is_file():
            raise XalError(f"{path} not found: --tasks expects a folder written by "
                           "select --format label-studio --out DIR")
    config = config_path.read_text(encoding="utf-8")
    try:
        tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise XalError(f"{tasks_path}: not JSON ({err})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict)
                                              for t in tasks):
        raise XalError(f"{tasks_path}: expected a list of tasks with 'data'")
    return config, tasks, _image_keys(config, config_path)


def _local_images(tasks: list[dict[str, Any]], keys: list[str], tasks_dir: Path) -> list[str]:
    """The relative image paths the tasks name (each once, in order), every file checked to exist
    inside tasks_dir first."""
    root = tasks_dir.resolve()
    paths: dict[str, None] = {}
    for t, task in enumerate(tasks, start=1):
        for key in keys:
            value = task["data"].get(key)
            if not isinstance(value, str) or not value:
                raise XalError(f"{tasks_dir / TASKS_JSON}: task {t} has no data.{key}")
            if value.startswith(ABSOLUTE_PREFIXES):
                continue
            file = (tasks_dir / value).resolve()
            if not file.is_relative_to(root):
                raise XalError(f"{tasks_dir / TASKS_JSON}: task {t}'s data.{key} {value!r} leads outside {tasks_dir}")
            if not file.is_file():
                raise XalError(f"{tasks_dir / TASKS_JSON}: task {t}'s image {file} not found")
            paths[value] = None
    return list(paths)


def _upload(client: Any, server: Server, project_id: int, tasks_dir: Path, paths: list[str]) -> dict[str, str]:
    """Upload the images as the project's file uploads (no tasks made of them); path -> served URL."""
    urls: dict[str, str] = {}
    for start in range(0, len(paths), UPLOAD_BATCH):
        part = paths[start:start + UPLOAD_BATCH]
        handles = [open(tasks_dir / p, "rb") for p in part]  # noqa: SIM115 - closed below
        try:
            files = {f"file{i}": (Path(p).name, h, "image/png") for i, (p, h) in enumerate(zip(part, handles))}
            with _errors(server, f"uploading {len(part)} image(s)"):
                body = _raw(client, f"api/projects/{project_id}/import", method="POST",
                            params={"commit_to_project": "false"}, files=files)
        finally:
            for h in handles:
                h.close()
        ids = body.get("file_upload_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or len(ids) != len(part):
            raise XalError(f"Label Studio at {server.url} did not report {len(part)} file uploads: {_detail(body)}")
        with _errors(server, "reading the uploaded files' names"):
            names = {u.id: u.file for u in client.files.list(project_id, ids=json.dumps(ids))}
        for path, id_ in zip(part, ids):  # ids come in the order of the request's files
            name = names.get(id_)
            if not name or not str(name).endswith(Path(path).name):
                raise XalError(f"Label Studio at {server.url} lost the upload of {path}")
            urls[path] = SERVED_PREFIX + str(name).lstrip("/")
    return urls


def _xal_ids(client: Any, server: Server, project_id: int) -> set[str]:
    """data.xal_id of the project's tasks."""
    with _errors(server, "listing the project's tasks"):
        return {str(t.data.get("xal_id")) for t in client.tasks.list(project=project_id, fields="all")
                if isinstance(t.data, dict) and t.data.get("xal_id") is not None}


def push(url: str, token: str, project: str, tasks_dir: str | Path, *, timeout_s: float = 10.0) -> PushSummary:
    """Create (or find) the project with tasks_dir/config.xml, upload the batch's images and import
    tasks_dir/tasks.json with its predictions; tasks already there (same data.xal_id) are skipped."""
    server, tasks_dir = Server(url, token, timeout_s), Path(tasks_dir)
    config, tasks, keys = _read_batch(tasks_dir)
    paths = _local_images(tasks, keys, tasks_dir)  # every file checked before anything is sent
    client = _client(server)
    found = _find_project(client, server, project)
    created = config_updated = False
    if found is None:
        with _errors(server, f"creating project {project!r}"):
            found = client.projects.create(title=project, label_config=config)
        created = True
    elif " ".join(str(found.label_config or "").split()) != " ".join(config.split()):
        with _errors(server, f"setting project {found.id}'s labelling config to {tasks_dir / CONFIG_XML}"):
            client.projects.update(found.id, label_config=config)
        config_updated = True
    project_id = int(found.id)
    present = set() if created else _xal_ids(client, server, project_id)
    new = [t for t in tasks if str(t["data"].get("xal_id")) not in present or "xal_id" not in t["data"]]
    needed = {t["data"][k] for t in new for k in keys}
    urls = _upload(client, server, project_id, tasks_dir, [p for p in paths if p in needed])
    body = []
    for task in new:
        data = {k: urls.get(v, v) if k in keys else v for k, v in task["data"].items()}
        meta = {**(task.get("meta") or {}), "xal_source": {k: task["data"][k] for k in keys}}
        body.append({**task, "data": data, "meta": meta})
    if body:
        with _errors(server, f"importing {len(body)} task(s) into project {project_id}"):
            client.projects.import_tasks(project_id, request=body, return_task_ids=True)
    return PushSummary(project_id, str(found.title), created, len(body), len(tasks) - len(new), len(urls),
                       config_updated)


# ---------------------------------------------------------------------------------------------- pull
def pull(url: str, token: str, project: str, out: str | Path, *, timeout_s: float = 10.0) -> PullSummary:
    """Write the project's annotated tasks as Label Studio's JSON export to ``out``."""
    server, out = Server(url, token, timeout_s), Path(out)
    client = _client(server)
    found = _find_project(client, server, project)
    if found is None:
        raise XalError(f"Label Studio at {server.url} has no project titled {project!r}")
    with _errors(server, f"exporting project {found.id}"):
        data = b"".join(client.projects.exports.download_sync(found.id, export_type="JSON",
                                                              download_all_tasks=False))
    try:
        tasks = json.loads(data)
    except ValueError:
        raise XalError(f"Label Studio at {server.url} sent an export of project {found.id} that is not JSON") from None
    if not isinstance(tasks, list):
        raise XalError(f"Label Studio at {server.url} sent an export of project {found.id} that is not a task list")
    out.write_bytes(data)
    n_annotations = sum(len(t.get("annotations") or []) for t in tasks if isinstance(t, dict))
    return PullSummary(int(found.id), str(found.title), out, len(tasks), n_annotations)
