"""The demo's limits (issue 25), without loading models where none is needed: localhost and no share link by default,
a warning and optional login beyond it, a bounded queue, uploads capped and read from gradio's upload folder only, a
thumbnail preview, image rules tuned off the request path, and streamed runs timed as `generate` is."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

import mmspec
from mmspec import Exact, Lantern, TreeConfig
from mmspec.cli import build_parser, main
from mmspec.demos import app as demo_app
from mmspec.demos.app import AUTH_ENV, QUEUE_SIZE, Demo, build_app, launch_options, nearest_tree

SCENE = Path(mmspec.__file__).parent / "assets" / "sample_scene.png"


def demo_args(*extra):
    return build_parser().parse_args(["demo", *extra])


def test_localhost_and_no_share_link_by_default(monkeypatch, caplog):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        options = launch_options(demo_args())
    assert options["server_name"] == "127.0.0.1" and options["share"] is False and options["auth"] is None
    assert options["max_file_size"] == demo_app.MAX_FILE_SIZE
    assert not caplog.records  # nothing to warn about on this machine only


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_do_not_warn(host, monkeypatch, caplog):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        launch_options(demo_args("--host", host))
    assert not caplog.records


@pytest.mark.parametrize("extra", [["--host", "0.0.0.0"], ["--host", "192.168.1.5"], ["--share"]])
def test_reachable_beyond_this_machine_warns_until_a_login_is_set(extra, monkeypatch, caplog):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        launch_options(demo_args(*extra))
    assert "anyone who reaches it" in caplog.text and "--auth" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        options = launch_options(demo_args(*extra, "--auth", "ann:s3cret"))
    assert options["auth"] == ("ann", "s3cret") and "anyone" not in caplog.text


def test_login_from_the_environment(monkeypatch):
    monkeypatch.setenv(AUTH_ENV, "bob:pw:with:colons")
    assert launch_options(demo_args())["auth"] == ("bob", "pw:with:colons")


@pytest.mark.parametrize("bad", ["nopassword", ":pw", "user:"])
def test_bad_login_is_one_line_exit_2(bad, capsys, monkeypatch):
    monkeypatch.setattr(demo_app, "load_demo", lambda *a, **k: pytest.fail("models loaded before --auth was checked"))
    assert main(["demo", "--auth", bad]) == 2
    err = capsys.readouterr().err
    assert "USER:PASSWORD" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_queue_is_bounded():
    app = demo_app.queue(build_app(Demo(None, None, "off", "off")))
    assert app._queue.max_size == QUEUE_SIZE


def test_preview_is_a_thumbnail_and_refuses_a_bomb(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500), (200, 30, 30)).save(big)
    assert max(demo_app._preview(str(big)).size) == demo_app.PREVIEW_PX
    bomb = tmp_path / "bomb.png"
    Image.new("1", (15000, 13000)).save(bomb)
    assert demo_app._preview(str(bomb)) is None


class Recording(Demo):
    """Records what the Ask handler receives instead of running a model."""

    def ask(self, image, question, compare=False, max_new_tokens=128, temperature=0.0):
        self.seen.append(image)
        yield "ok", "", "", ""


@pytest.fixture(scope="module")
def recording():
    demo = Recording(None, None, "off", "off")
    demo.seen = []
    app = demo_app.queue(build_app(demo))
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, max_file_size=demo_app.MAX_FILE_SIZE,
                           quiet=True)
    yield demo, url
    app.close()


def _call_ask(url: str, data: list) -> str:
    """The raw HTTP API: what a client that is not gradio_client can send."""
    req = urllib.request.Request(url + "gradio_api/call/ask", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(req, timeout=60).read())["event_id"]
    return urllib.request.urlopen(url + f"gradio_api/call/ask/{event}", timeout=60).read().decode()


def test_a_server_file_path_sent_as_a_file_is_refused(recording, tmp_path):
    demo, url = recording
    secret = tmp_path / "secret.png"  # a readable image on the server, outside gradio's upload folder
    shutil.copy(SCENE, secret)
    demo.seen.clear()
    for value in ({"path": str(secret), "meta": {"_type": "gradio.FileData"}}, str(secret)):
        assert "event: error" in _call_ask(url, [value, "q", False, 8, 0.0])
    assert demo.seen == []  # refused before the handler
    from gradio_client import Client, handle_file

    assert Client(url, verbose=False).predict(handle_file(str(SCENE)), "q", api_name="/ask")[0] == "ok"
    assert len(demo.seen) == 1 and Path(demo.seen[0]).name == SCENE.name and Path(demo.seen[0]) != SCENE


def test_an_oversized_upload_is_refused(recording):
    _, url = recording
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + b"\0" * (11 * 2**20) + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "gradio_api/upload", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert refused.value.code == 413


def test_nearest_tree_prefers_the_same_rule_then_close_parameters():
    small, mid, exact = (TreeConfig(depth=d, top_k=2, total_tokens=3) for d in (1, 2, 3))
    tuned = {repr(Exact()): (exact, {}), repr(Lantern(k=4, delta=0.1)): (small, {}),
             repr(Lantern(k=8, delta=0.4)): (mid, {})}
    assert nearest_tree(tuned, Lantern(k=8, delta=0.3), None) == mid
    assert nearest_tree(tuned, Lantern(k=4, delta=0.05), None) == small
    assert nearest_tree({repr(Exact()): (exact, {})}, Lantern(k=8, delta=0.3), None) == exact
    assert nearest_tree({}, Exact(), "fallback") == "fallback"


def test_image_rules_are_tuned_off_the_request_path(tiny_dir):
    """A rule with no measured auto tree is measured on a background thread; the request does not wait for it."""
    gen = mmspec.load(tiny_dir("janus"), drafter="untrained", device="cpu", tree=TreeConfig.preset("auto"))
    measured = TreeConfig(depth=2, top_k=2, total_tokens=3)
    release, calls = threading.Event(), []

    def slow_tuner(pipe, rules, source):
        calls.append([repr(r) for r in rules])
        assert release.wait(60)
        return {repr(r): (measured, {}) for r in rules}

    gen.tuner = slow_tuner
    gen.tuned = {repr(Exact()): (TreeConfig(depth=3, top_k=2, total_tokens=5), {})}
    demo = Demo(None, gen)
    *_, (image, line, _) = demo.generate_image("a red circle", rule="lantern", k=4, delta=0.2, seed=1)
    assert image is not None and "depth 3, top_k 2, total 5" in line and "background" in line
    assert calls == [[repr(Lantern(k=4, delta=0.2))]] and not release.is_set()  # still measuring
    release.set()
    for _ in range(600):
        if not demo.tuning:
            break
        time.sleep(0.05)
    assert gen.tuned[repr(Lantern(k=4, delta=0.2))][0] == measured
    *_, (_, line, _) = demo.generate_image("a red circle", rule="lantern", k=4, delta=0.2, seed=1)
    assert "background" not in line and len(calls) == 1


def test_a_streamed_run_leaves_out_the_consumers_time(tiny_dir):
    """The demo renders the page between events; that time is the consumer's, not speculative decoding's."""
    pipe = mmspec.load(tiny_dir("llava"), "untrained", device="cpu")
    pause, events = 1.0, 0
    for ev in pipe.stream("hi", max_new_tokens=6):
        events += 1
        time.sleep(pause)
        stats = ev.stats
    # the consumer held the events (events - 1) * pause seconds before the last one; a tiny model's 6 tokens take far
    # less even on a busy machine
    assert events >= 3 and stats.wall_s < pause * (events - 1), (events, stats.wall_s)
