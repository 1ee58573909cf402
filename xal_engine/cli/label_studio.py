"""`xal-engine label-studio push | pull`: send a batch written by `select --format label-studio` to a
Label Studio server, and import its finished annotations into a pool (the import of `label --import
EXPORT.json --format label-studio`, run on the export it downloads)."""

from __future__ import annotations

import argparse
import os
import stat
import tempfile
from pathlib import Path

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
TIMEOUT_S = 10.0


class _RefuseKeyFlag(argparse.Action):
    """``--token``/``--api-key`` VALUE: refused without echoing VALUE (a key belongs in no command line)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string}: the API key is never given as a flag (it would land in shell "
                     f"history and logs); set {TOKEN_ENV} or use --token-file FILE")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label-studio",
        help="push a batch to a Label Studio server, pull its annotations into a pool",
        description=(
            f"Live mode with a Label Studio server. The API key (legacy token or personal access token) "
            f"comes from the environment variable {TOKEN_ENV}, or from --token-file (readable by its owner "
            "only), never from a flag value. Every request gives up after --timeout seconds."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    # no abbreviations: `--token SECRET` must never be taken for `--token-file SECRET`

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
        q.add_argument("--project", required=True,
                       help="project title (push creates it when no project has it) or numeric id")
        q.add_argument("--token-file", default=None,
                       help=f"file holding the API key (mode 600); default: ${TOKEN_ENV}")
        q.add_argument("--token", "--api-key", "--token-value", nargs="?", action=_RefuseKeyFlag,
                       help=argparse.SUPPRESS)
        q.add_argument("--timeout", type=float, default=TIMEOUT_S,
                       help=f"seconds to wait for each answer of the server (default {TIMEOUT_S:g})")

    push = actions.add_parser(
        "push", allow_abbrev=False, help="create or find the project, upload the batch's images and import its tasks",
        description=("Creates the project (titled --project, with DIR/config.xml as its labelling config) "
                     "or finds it, uploads the PNGs the tasks name and imports DIR/tasks.json with the "
                     "model's pre-annotations. Tasks already in the project (same image id) are skipped."))
    common(push)
    push.add_argument("--tasks", required=True, metavar="DIR",
                      help="folder written by `select --format label-studio --out DIR`")
    push.set_defaults(func=run_push)

    pull = actions.add_parser(
        "pull", allow_abbrev=False, help="download the project's annotations and import them into a pool",
        description=("Downloads the project's annotated tasks (Label Studio's JSON export) and imports "
                     "them as `label --import EXPORT.json --format label-studio` does, with its checks: "
                     "any problem and nothing is written."))
    common(pull)
    pull.add_argument("--pool", required=True, help="pool (Zarr v3 group) to write into")
    pull.add_argument("--experiment", default=None, help="AL experiment whose labelled set grows")
    pull.add_argument("--round", type=int, default=None,
                      help="AL round of this batch (default: the experiment's last round + 1)")
    pull.add_argument("--out", default=None, metavar="EXPORT.json",
                      help="keep the downloaded export there (default: a temporary file, removed)")
    pull.add_argument("--dry-run", action="store_true", help="check and print what would change; write nothing")
    pull.add_argument("--json", action="store_true", help="print the import's summary as JSON")
    pull.set_defaults(func=run_pull)


def read_token(token_file: str | None) -> str:
    """The API key: the first line of token_file (refused when group or others may read it), else
    $LABEL_STUDIO_API_KEY. Never echoed."""
    from xal_engine.errors import XalError

    if token_file is None:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise XalError(f"no API key: set {TOKEN_ENV} or give --token-file FILE")
        return token
    path = Path(token_file)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise XalError(f"--token-file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise XalError(f"--token-file {path}: cannot read it ({type(err).__name__})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise XalError(f"--token-file {path}: readable by others (mode {stat.S_IMODE(mode):03o}); "
                       f"chmod 600 {path}")
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise XalError(f"--token-file {path}: empty")
    return token


def _timeout(value: float) -> float:
    from xal_engine.errors import XalError

    if not value > 0:
        raise XalError(f"--timeout {value:g}: expected seconds > 0")
    return value


def run_push(args: argparse.Namespace) -> int:
    from xal_engine.exchange.label_studio_api import push

    s = push(args.url, read_token(args.token_file), args.project, args.tasks, timeout_s=_timeout(args.timeout))
    how = "created" if s.created else "config replaced" if s.config_updated else "existing"
    skipped = f", {s.n_skipped} already there skipped" if s.n_skipped else ""
    print(f"pushed {s.n_tasks} task(s) ({s.n_uploaded} image(s) uploaded{skipped}) to project "
          f"{s.project_title!r} (id {s.project_id}, {how}) at {args.url}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from xal_engine.cli import build_parser
    from xal_engine.errors import XalError
    from xal_engine.exchange.label_studio_api import pull

    token, timeout = read_token(args.token_file), _timeout(args.timeout)
    with tempfile.TemporaryDirectory(prefix="xal-label-studio-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "export.json"
        s = pull(args.url, token, args.project, out, timeout_s=timeout)
        if not s.n_tasks:
            raise XalError(f"project {s.project_title!r} (id {s.project_id}) at {args.url} has no annotated "
                           "task yet: nothing imported")
        if not args.json:
            print(f"pulled {s.n_tasks} annotated task(s), {s.n_annotations} annotation(s), from project "
                  f"{s.project_title!r} (id {s.project_id}) at {args.url}"
                  + (f" into {out}" if args.out else ""))
        argv = ["label", "--pool", args.pool, "--import", str(out), "--format", "label-studio"]
        argv += ["--experiment", args.experiment] if args.experiment is not None else []
        argv += ["--round", str(args.round)] if args.round is not None else []
        argv += ["--dry-run"] * args.dry_run + ["--json"] * args.json
        label = build_parser(only="label").parse_args(argv)  # the same flags, defaults and checks
        return int(label.func(label) or 0)
