"""Where a pool lives: a local path or an object-store URL, and the one place that turns either into a
Zarr store. Every other module asks here; nothing else parses a pool path.

    pool.zarr, /data/pool.zarr, file:///data/pool.zarr   -> Path (LocalStore; lock files, rename, fsync)
    s3://bucket/prefix/pool.zarr (also s3a://)           -> StoreURL (zarr.storage.ObjectStore over obstore)
    gs://bucket/prefix/pool.zarr, az://container/prefix  -> StoreURL (obstore's GCS and Azure stores)

Why obstore rather than fsspec/s3fs: obstore (Rust ``object_store``) has bounded retries with a total
retry timeout and connect/request timeouts as plain options, so an unreachable endpoint or a wrong
bucket fails in well under a second instead of botocore's retry ladder; it reads the standard
environment itself; and its requests run off the GIL, which the loader's read-ahead needs (zarr's
``ObjectStore`` wraps it directly, no aiobotocore event-loop bridging).

Credentials and endpoint come from the ecosystem's environment, never from a flag: for S3
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, Ceph; an ``http://``
endpoint allows plain HTTP), and ``AWS_PROFILE`` (through boto3's credential chain, when boto3 is
installed and no key is in the environment); for GCS ``GOOGLE_SERVICE_ACCOUNT`` and friends, for Azure
``AZURE_STORAGE_ACCOUNT_NAME`` and friends (obstore reads them). Anything else goes in the JSON object
that ``XAL_STORAGE_OPTIONS`` holds, or names as a file::

    {"client_options": {"timeout": "300s"}, "retry_config": {"max_retries": 5, "retry_timeout": 60},
     "region": "eu-west-1", "virtual_hosted_style_request": false}

(``client_options`` and ``retry_config`` as obstore spells them, seconds as numbers; every other key is
the store's config.)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import zarr

from xal_engine.errors import PoolError

STORAGE_OPTIONS_ENV = "XAL_STORAGE_OPTIONS"
OBJECT_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure": "az",
                  "abfs": "abfs", "abfss": "abfss"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
# Fail fast: a refused connection gives up after ~0.2 s, an unanswered one after connect_timeout, and
# no request is retried for longer than retry_timeout in all.
DEFAULT_CLIENT_OPTIONS = {"connect_timeout": "5s", "timeout": "120s"}
DEFAULT_RETRY = {"max_retries": 3, "retry_timeout": 20.0,
                 "backoff": {"init_backoff": 0.1, "max_backoff": 2.0, "base": 2}}
# Chunk fetches in flight per zarr call on an object store (zarr's default 10 is for disks): a 64-image
# loader item over 4 arrays is 4 requests, and the read-ahead keeps several items in flight.
OBJECT_STORE_CONCURRENCY = 64


@dataclass(frozen=True)
class StoreURL:
    """An object-store location ``scheme://bucket/key`` (no trailing slash)."""

    url: str

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def bucket(self) -> str:
        return self.url.split("://", 1)[1].split("/", 1)[0]

    @property
    def key(self) -> str:
        return self.url.split("://", 1)[1].split("/", 1)[1]

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[1]

    def with_name(self, name: str) -> StoreURL:
        return StoreURL(self.url.rsplit("/", 1)[0] + "/" + name)

    def __str__(self) -> str:
        return self.url


Location = Path | StoreURL


def parse_location(path: str | Path | StoreURL) -> Location:
    """A pool path as given on the command line: a local path (also ``file://``) or an object-store URL."""
    if isinstance(path, (Path, StoreURL)):
        return path
    text = str(path)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    scheme = match.group(1).lower()
    if scheme == "file":
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise PoolError(f"{text}: file:// URLs name this machine's files (file:///abs/path), "
                            f"not host {parsed.netloc!r}")
        return Path(unquote(parsed.path))
    if scheme not in OBJECT_SCHEMES:
        raise PoolError(f"{text}: unsupported URL scheme '{scheme}://' (expected a local path, file://, "
                        "s3://, gs:// or az://)")
    rest = match.group(2).strip("/")
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise PoolError(f"{text}: an object-store pool needs a bucket and a key, e.g. "
                        f"{scheme}://bucket/prefix/pool.zarr")
    return StoreURL(f"{scheme}://{bucket}/{key}")


def is_remote(path: str | Path | StoreURL | None) -> bool:
    """Whether ``path`` names an object-store location (no lock files, no rename, no fsync there)."""
    return path is not None and isinstance(parse_location(path), StoreURL)


def local_path(path: str | Path | StoreURL) -> Path | None:
    """The local path of a pool location; None for an object-store URL."""
    loc = parse_location(path)
    return loc if isinstance(loc, Path) else None


def absolute(path: str | Path | StoreURL) -> str:
    """The location as a string that means the same from any working directory (and on other nodes)."""
    loc = parse_location(path)
    return str(loc.resolve()) if isinstance(loc, Path) else str(loc)


def local_root(node: zarr.Group | zarr.Array) -> Path | None:
    """The folder of a group or array on a local store (``LocalStore``); None on an object store."""
    root = getattr(node.store, "root", None)
    return None if root is None else Path(root) / node.path


# ---------------------------------------------------------------------------- object stores
def storage_options() -> dict[str, Any]:
    """The JSON object of ``XAL_STORAGE_OPTIONS`` (inline JSON or a file name); {} when unset."""
    value = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not value:
        return {}
    try:
        text = value if value.startswith("{") else Path(value).read_text()
        options = json.loads(text)
    except OSError as err:
        raise PoolError(f"{STORAGE_OPTIONS_ENV}={value}: cannot read it ({err.strerror})") from None
    except ValueError as err:
        raise PoolError(f"{STORAGE_OPTIONS_ENV}: not valid JSON ({err})") from None
    if not isinstance(options, dict):
        raise PoolError(f"{STORAGE_OPTIONS_ENV}: expected a JSON object, got {type(options).__name__}")
    return options


def _seconds(value: Any) -> Any:
    return timedelta(seconds=float(value)) if isinstance(value, (int, float)) else value


def _retry_config(given: dict[str, Any]) -> dict[str, Any]:
    retry = {**DEFAULT_RETRY, **given}
    backoff = {**DEFAULT_RETRY["backoff"], **retry.get("backoff", {})}  # type: ignore[dict-item]
    return {"max_retries": int(retry["max_retries"]), "retry_timeout": _seconds(retry["retry_timeout"]),
            "backoff": {"init_backoff": _seconds(backoff["init_backoff"]),
                        "max_backoff": _seconds(backoff["max_backoff"]), "base": float(backoff["base"])}}


def endpoint(url: StoreURL) -> str | None:
    """The S3 endpoint from the environment (``AWS_ENDPOINT_URL_S3`` first, as the AWS SDKs do)."""
    if OBJECT_SCHEMES[url.scheme] != "s3":
        return None
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def object_store(url: StoreURL) -> Any:
    """The obstore store at ``url`` (its key as prefix), configured from the environment."""
    try:
        from obstore.store import from_url
    except ImportError:
        raise PoolError(f"{url}: object-store pools need obstore (pip install -e \".[s3]\")") from None
    options = storage_options()
    client = {**DEFAULT_CLIENT_OPTIONS, **options.pop("client_options", {})}
    retry = _retry_config(options.pop("retry_config", {}))
    config: dict[str, Any] = dict(options)
    kwargs: dict[str, Any] = {}
    kind = OBJECT_SCHEMES[url.scheme]
    if kind == "s3":
        found = endpoint(url)
        if found and "endpoint" not in config and "aws_endpoint" not in config:
            config["endpoint"] = found
        if str(config.get("endpoint", "")).startswith("http://"):
            client.setdefault("allow_http", True)
        if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID") \
                and "access_key_id" not in config:
            kwargs["credential_provider"] = _profile_credentials(url)
    full = url.url if url.scheme == kind else f"{kind}://{url.url.split('://', 1)[1]}"
    try:
        return from_url(full, config=config or None, client_options=client, retry_config=retry, **kwargs)
    except Exception as err:  # unknown option names, a malformed endpoint
        raise PoolError(f"{url}: cannot configure the object store ({_first_line(err)})") from err


def _profile_credentials(url: StoreURL) -> Any:
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise PoolError(f"{url}: AWS_PROFILE needs boto3 installed (or set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY)") from None
    return Boto3CredentialProvider(boto3.Session(profile_name=os.environ["AWS_PROFILE"]))


def _configure_concurrency() -> None:
    """Raise zarr's ``async.concurrency`` for object stores, unless the user set it (env or config)."""
    if "ZARR_ASYNC__CONCURRENCY" in os.environ:
        return
    if int(zarr.config.get("async.concurrency") or 0) < OBJECT_STORE_CONCURRENCY:
        zarr.config.set({"async.concurrency": OBJECT_STORE_CONCURRENCY})


def zarr_store(url: StoreURL, read_only: bool) -> zarr.abc.store.Store:
    """A zarr ``ObjectStore`` at ``url``."""
    from zarr.storage import ObjectStore

    _configure_concurrency()
    return ObjectStore(object_store(url), read_only=read_only)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def explain(url: StoreURL, err: BaseException) -> PoolError:
    """An object-store failure as one line naming the URL and what to check."""
    text = str(err)
    status = re.search(r"\b(40[0-9]|50[0-9]) [A-Z][A-Za-z ]*", text)
    if "NoSuchBucket" in text:
        return PoolError(f"{url}: bucket {url.bucket!r} does not exist")
    if (status and status.group(1) in ("401", "403")) or "PermissionDenied" in type(err).__name__ \
            or "Unauthenticated" in type(err).__name__:
        return PoolError(f"{url}: access denied ({status.group(0).strip() if status else type(err).__name__}): "
                         "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy")
    if "error sending request" in text or "connect" in text.lower() or "timed out" in text.lower():
        where = endpoint(url) or "the default endpoint"
        retries = re.search(r"after (\d+) retries", text)
        tried = f" after {retries.group(1)} retries" if retries else ""
        return PoolError(f"{url}: cannot reach the object store at {where}{tried} "
                         "(check AWS_ENDPOINT_URL and the network)")
    return PoolError(f"{url}: object-store request failed ({_first_line(err)})")


def probe(url: StoreURL) -> str:
    """What is at ``url``: "group" (a zarr.json), "other" (keys but no zarr.json) or "missing";
    :class:`PoolError` (one line) for an unknown bucket, refused credentials or an unreachable store."""
    import obstore

    store = object_store(url)
    try:
        obstore.head(store, "zarr.json")
        return "group"
    except FileNotFoundError:
        pass
    except Exception as err:
        raise explain(url, err) from err
    try:  # a missing key and a missing bucket both answer 404 to HEAD: the listing tells them apart
        page = next(iter(obstore.list(store, None, chunk_size=1)), [])
    except StopIteration:
        page = []
    except Exception as err:
        raise explain(url, err) from err
    return "other" if page else "missing"


def delete_all(url: StoreURL) -> int:
    """Delete every key under ``url`` (an overwrite of an object-store pool); returns the count."""
    import obstore

    store = object_store(url)
    try:
        paths = [meta["path"] for page in obstore.list(store, None) for meta in page]
        for i in range(0, len(paths), 1000):
            obstore.delete(store, paths[i:i + 1000])
    except Exception as err:
        raise explain(url, err) from err
    return len(paths)


def read_json(url: StoreURL, key: str) -> Any:
    """The JSON value stored at ``key`` under ``url``; None when it is missing or does not parse."""
    import obstore

    try:
        return json.loads(bytes(obstore.get(object_store(url), key).bytes()))
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    except Exception as err:
        raise explain(url, err) from err


def exists(path: str | Path | StoreURL) -> bool:
    """Whether anything is stored at ``path`` (an unreachable or refused object store: False)."""
    loc = parse_location(path)
    if isinstance(loc, Path):
        return loc.exists()
    try:
        return probe(loc) != "missing"
    except PoolError:
        return False
