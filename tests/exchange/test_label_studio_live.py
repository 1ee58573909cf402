"""Live mode against a real Label Studio server (tests/exchange/conftest.py): select a batch, push it,
annotate it through the server's REST API as an annotator's browser does, pull, and find in the pool
exactly the classes and brush masks that were posted; a wrong key, an unknown project and an
unreachable or silent server end as one line, exit 2."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from xal_engine.cli import main
from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.ingest.synthetic import SyntheticConfig, class_names, generate_block
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, Pool, PoolWriter

pytestmark = pytest.mark.slow

N, SIZE, CHUNK, BUDGET = 24, 32, 8, 4
CLASSES = tuple(class_names(3))
PROJECT = "xal live round"
EXPERIMENT = "live"


# ------------------------------------------------------------------------------------------ helpers
def api(server: Any, path: str, method: str = "GET", body: Any = None, token: str | None = None) -> Any:
    """One REST call as the Label Studio frontend makes it (legacy token auth); JSON back."""
    request = urllib.request.Request(
        f"{server.url}{path}", method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Token {token or server.token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        data = r.read()
    return json.loads(data) if r.headers.get_content_type() == "application/json" else data


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def brush(mask: np.ndarray) -> dict[str, Any]:
    """A brushlabels result as the frontend posts it, RLE made by label-studio-sdk's own encoder."""
    from label_studio_sdk.converter.brush import mask2rle

    return {"from_name": "roi", "to_name": "image", "type": "brushlabels", "origin": "manual",
            "original_width": SIZE, "original_height": SIZE, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["ROI"]}}


def choice(name: str) -> dict[str, Any]:
    return {"from_name": "class", "to_name": "image", "type": "choices", "origin": "manual",
            "value": {"choices": [name]}}


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-image pool (labels unknown; 2 test images) scored by an untrained resnet18, CAMs stored."""
    root = tmp_path_factory.mktemp("live")
    split = np.full(N, SPLIT_TRAIN, dtype=np.uint8)
    split[[3, 17]] = SPLIT_TEST
    g = generate_block(SyntheticConfig(n=N, size=SIZE, classes=3, seed=5, roi_fraction=0.5), 0, split)
    pool = root / "pool.zarr"
    with PoolWriter(pool, channels=1, height=SIZE, width=SIZE, dtype=np.uint8, classes=CLASSES,
                    chunk_size=CHUNK) as w:
        w.append(g.images, g.rois, g.has_roi, np.full(N, -1, dtype=np.int16), g.ids, g.split)
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES), 1)
    save_checkpoint(root / "model.pt", model, Checkpoint(arch="resnet18", num_classes=len(CLASSES), in_channels=1,
                                                         classes=CLASSES, target_layer="layer2"))
    score_pool(pool, root / "model.pt", ScoreConfig(run="r", batch_size=CHUNK, num_workers=0, save_cams=True))
    return pool


# --------------------------------------------------------------------------------------- round trip
def test_push_annotate_pull_round_trip(scored: Path, label_studio: Any, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    batch = tmp_path / "batch"
    assert main(["select", "--pool", str(scored), "--run", "r", "--budget", str(BUDGET),
                 "--format", "label-studio", "--out", str(batch), "--device", "cpu"]) == 0
    sent = json.loads((batch / "tasks.json").read_text())
    assert len(sent) == BUDGET
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    capsys.readouterr()

    push = ["label-studio", "push", "--url", label_studio.url, "--project", PROJECT, "--tasks", str(batch)]
    assert main(push) == 0
    out = capsys.readouterr().out
    assert f"pushed {BUDGET} task(s) ({BUDGET} image(s) uploaded)" in out and "created" in out
    assert label_studio.token not in out
    assert main(push) == 0  # pushing the same batch again adds nothing
    out = capsys.readouterr().out
    assert f"pushed 0 task(s) (0 image(s) uploaded, {BUDGET} already there skipped)" in out
    assert "existing)" in out  # found by title, its labelling config already the batch's

    (project,) = [p for p in api(label_studio, "/api/projects")["results"] if p["title"] == PROJECT]
    assert " ".join(project["label_config"].split()) == " ".join((batch / "config.xml").read_text().split())
    listed = api(label_studio, f"/api/tasks?project={project['id']}&fields=all&page_size=100")["tasks"]
    tasks = {t["data"]["xal_id"]: t for t in listed}
    assert sorted(tasks) == sorted(t["data"]["xal_id"] for t in sent)
    for original in sent:
        task = api(label_studio, f"/api/tasks/{tasks[original['data']['xal_id']]['id']}")
        # the server serves the very PNG select wrote, and holds the model's pre-annotation
        assert api(label_studio, task["data"]["image"]) == (batch / original["data"]["image"]).read_bytes()
        assert [p["result"] for p in task["predictions"]] == [p["result"] for p in original["predictions"]]
        assert {k: v for k, v in task["data"].items() if k != "image"} == \
               {k: v for k, v in original["data"].items() if k != "image"}

    # an annotator's round: class + brush mask; class only; a skipped task; two annotators agreeing on
    # the class, with a mask each (the ROI is their strict majority: the intersection)
    ids = [t["data"]["xal_id"] for t in sent]
    masks = {ids[0]: box(4, 20, 6, 30), ids[3]: box(10, 31, 0, 16) & box(0, 32, 5, 12)}
    posted = {ids[0]: CLASSES[2], ids[1]: CLASSES[0], ids[3]: CLASSES[1]}
    annotations = {
        ids[0]: [{"result": [choice(CLASSES[2]), brush(masks[ids[0]])]}],
        ids[1]: [{"result": [choice(CLASSES[0])]}],
        ids[2]: [{"result": [], "was_cancelled": True}],
        ids[3]: [{"result": [choice(CLASSES[1]), brush(box(10, 31, 0, 16))]},
                 {"result": [choice(CLASSES[1]), brush(box(0, 32, 5, 12))]}],
    }
    pool = Pool.open(scored)
    index = pool.find_ids(ids)
    rois_before, has_before = pool.take("rois", index), pool.take("has_roi", index)
    before = snapshot(scored)
    pull = ["label-studio", "pull", "--url", label_studio.url, "--project", PROJECT, "--pool", str(scored),
            "--experiment", EXPERIMENT]
    assert "has no annotated task yet: nothing imported" in one_line_exit_2(capsys, pull)  # none posted yet
    for id_, posts in annotations.items():
        for body in posts:
            api(label_studio, f"/api/tasks/{tasks[id_]['id']}/annotations", method="POST", body=body)

    assert main([*pull, "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out and snapshot(scored) == before

    token_file = tmp_path / "token"
    token_file.write_text(label_studio.token + "\n")
    token_file.chmod(0o600)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY")
    export = tmp_path / "export.json"
    assert main([*pull, "--token-file", str(token_file), "--out", str(export)]) == 0
    out = capsys.readouterr().out
    assert "pulled 4 annotated task(s), 5 annotation(s)" in out and f"imported 3 labels into {scored}" in out
    assert len(json.loads(export.read_text())) == 4

    pool = Pool.open(scored)
    labels, rois, has_roi = pool.take("labels", index), pool.take("rois", index), pool.take("has_roi", index)
    for i, id_ in enumerate(ids):
        assert labels[i] == (CLASSES.index(posted[id_]) if id_ in posted else -1), id_
        if id_ in masks:  # the posted mask, pixel for pixel
            assert has_roi[i] and np.array_equal(rois[i].astype(bool), masks[id_]), id_
        else:  # no ROI drawn: the pool's ROI untouched
            assert has_roi[i] == has_before[i] and np.array_equal(rois[i], rois_before[i]), id_
    rounds = np.asarray(pool.group["al"][EXPERIMENT]["labelled_round"])
    assert sorted(np.flatnonzero(rounds >= 0).tolist()) == sorted(pool.find_ids(list(posted)).tolist())


# ------------------------------------------------------------------------------------------- errors
def test_wrong_key_and_unknown_project_are_one_line(scored: Path, label_studio: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    wrong = "not-the-token-4f1d2c"
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", wrong)
    err = one_line_exit_2(capsys, ["label-studio", "pull", "--url", label_studio.url, "--project", PROJECT,
                                   "--pool", str(scored)])
    assert "refused the API key (401)" in err and wrong not in err
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    before = snapshot(scored)
    for project, expected in (("no such project", "has no project titled 'no such project'"),
                              ("987654", "has no project with id 987654")):
        err = one_line_exit_2(capsys, ["label-studio", "pull", "--url", label_studio.url, "--project", project,
                                       "--pool", str(scored)])
        assert expected in err and label_studio.token not in err
    assert snapshot(scored) == before


def test_the_key_never_comes_from_a_loose_file_or_a_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    base = ["label-studio", "push", "--url", "http://127.0.0.1:9", "--project", "p", "--tasks", str(tmp_path)]
    assert "no API key: set LABEL_STUDIO_API_KEY" in one_line_exit_2(capsys, base)
    loose = tmp_path / "token"
    loose.write_text("secret-value-123\n")
    loose.chmod(0o644)
    err = one_line_exit_2(capsys, [*base, "--token-file", str(loose)])
    assert "readable by others (mode 644)" in err and "secret-value-123" not in err
    for flag in ("--token", "--api-key"):  # refused without echoing the value
        err = one_line_exit_2(capsys, [*base, flag, "secret-value-123"])
        assert "the API key is never given as a flag" in err and "secret-value-123" not in err
    # never an abbreviation of --token-file (a key would be read as a path, and named in the error)
    assert "unrecognized arguments: --tok" in one_line_exit_2(capsys, [*base, "--tok", "x"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_and_silent_servers_fail_within_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "some-token-value")
    (tmp_path / "tasks.json").write_text("[]")
    (tmp_path / "config.xml").write_text('<View><Image name="image" value="$image"/></View>')
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    err = one_line_exit_2(capsys, ["label-studio", "push", "--url", closed, "--project", "p", "--tasks",
                                   str(tmp_path), "--timeout", "2"])
    assert f"cannot reach Label Studio at {closed}" in err and time.monotonic() - start < 10

    # a server that accepts the connection and never answers: the read times out
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    silent = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        err = one_line_exit_2(capsys, ["label-studio", "pull", "--url", silent, "--project", "p", "--pool",
                                       str(tmp_path / "none.zarr"), "--timeout", "2"])
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join(5)
        for s in [*held, listener]:
            s.close()
    assert f"Label Studio at {silent} did not answer within 2 s" in err and elapsed < 10, (err, elapsed)
