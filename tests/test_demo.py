"""The Gradio demo end to end: gradio_client against both API endpoints on the built-in models, and a real browser
(Debian's chromium driven by playwright, never `playwright install`) that uploads, asks, generates and screenshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import mmspec
from mmspec.demos.app import Demo, build_app, load_demo

pytestmark = pytest.mark.slow
SCENE = Path(mmspec.__file__).parent / "assets" / "sample_scene.png"
QUESTION = "Describe the image in detail."
# the image tab's target and drafter (a directory and a drafter directory or "untrained" work too)
GEN, GEN_DRAFTER = os.environ.get("MMSPEC_DEMO_GEN", "mini-gen"), os.environ.get("MMSPEC_DEMO_GEN_DRAFTER")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served():
    demo = load_demo("mini-vlm", GEN, device="cpu", gen_drafter=GEN_DRAFTER)
    assert demo.vlm is not None and demo.gen is not None, (demo.vlm_error, demo.gen_error)
    app = build_app(demo)
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, max_file_size="10mb", quiet=True)
    yield demo, url
    app.close()


def test_ask_endpoint_equals_generate(served):
    from gradio_client import Client, handle_file

    demo, url = served
    res = Client(url, verbose=False).predict(handle_file(str(SCENE)), QUESTION, api_name="/ask")
    want = demo.vlm.generate(QUESTION, images=[str(SCENE)], max_new_tokens=128, seed=0)
    assert res[0] == want.text and len(want.token_ids) > 10
    assert "mm-draft" in res[1] and "mm-bonus" in res[1] and "tokens/s" in res[2] and "<svg" in res[3]


def test_generate_endpoint_returns_the_image(served, tmp_path):
    from gradio_client import Client
    from PIL import Image

    demo, url = served
    res = Client(url, verbose=False).predict("a big red circle at the top left", "exact", 8, 0.2, 2.0, 5.0, 3,
                                             api_name="/generate_image")
    got = Image.open(res[0]).convert("RGB")
    want = demo.gen.generate_image("a big red circle at the top left", seed=3).image
    k = got.width // want.width  # the demo scales small images up by whole pixels (nearest)
    assert k >= 1 and got.tobytes() == want.resize((want.width * k, want.height * k), resample=0).tobytes()
    assert "codes/s" in res[1] and res[2].count("mm-code") >= demo.gen.adapter.num_codes(demo.gen.target)


def test_generate_endpoint_drafts_with_jacobi_windows(served):
    from gradio_client import Client

    demo, url = served
    res = Client(url, verbose=False).predict("a big red circle at the top left", "exact", 8, 0.2, 2.0, 5.0, 4, False,
                                             "jacobi", api_name="/generate_image")
    got = Image.open(res[0]).convert("RGB")
    want = demo.gen.generate_image("a big red circle at the top left", seed=4, draft="jacobi")
    k = got.width // want.image.width
    assert got.tobytes() == want.image.resize((want.image.width * k, want.image.height * k), resample=0).tobytes()
    assert want.stats.draft_forwards == 0 and want.stats.mean_accepted > 1  # drafted without the drafter
    assert res[2].count("mm-drafted") >= 1


def test_bad_uploads_and_rules_are_explained(served, tmp_path):
    from gradio_client import Client, handle_file

    _, url = served
    client = Client(url, verbose=False)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png at all")
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(handle_file(str(fake)), QUESTION, api_name="/ask")
    with pytest.raises(Exception, match="greater than maximum value 1.0"):  # delta is a TV bound: at most 1
        client.predict("a red circle", "lantern", 8, 1.5, 2.0, 5.0, 0, api_name="/generate_image")
    with pytest.raises(Exception, match="describe the image"):
        client.predict("  ", api_name="/generate_image")


def test_one_request_at_a_time_per_model(served):
    """Each model's events share one concurrency slot, so its engine state never serves two requests at once."""
    _, url = served
    from gradio_client import Client

    info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    assert {"/ask", "/generate_image"} <= set(info["named_endpoints"])
    app_blocks = build_app(Demo(None, None, "off", "off"))
    limits = {d.api_name: (d.concurrency_id, d.concurrency_limit) for d in app_blocks.fns.values() if d.api_name}
    assert limits["ask"] == ("vlm", 1) and limits["generate_image"] == ("gen", 1)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MMSPEC_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (.ci/run installs it with apt)")
def test_in_a_real_browser(served, tmp_path):
    from playwright.sync_api import sync_playwright

    _, url = served
    shots = Path(os.environ.get("MMSPEC_SCREENSHOTS", tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.set_input_files("#image-upload input[type=file]", str(SCENE))
        page.wait_for_selector("#image-preview img", timeout=30_000)
        page.click("#ask-button")
        page.wait_for_selector("#answer-html .mm-bonus", timeout=60_000)
        _wait_idle(page)
        drafted = page.locator("#answer-html .mm-draft").count()
        bonus = page.locator("#answer-html .mm-bonus").count()
        assert drafted >= 1 and bonus >= 1
        assert "tokens/s" in page.inner_text("#ask-speed")
        assert page.locator("#ask-tree svg").count() == 1
        page.screenshot(path=str(shots / "demo-ask.png"), full_page=True)

        page.get_by_role("tab", name="Generate").click()
        page.click("#generate-button")
        page.wait_for_selector("#generated-image img", timeout=120_000)
        _wait_idle(page)
        assert page.locator("#code-map .mm-drafted").count() >= 1
        assert "codes/s" in page.inner_text("#generate-speed")
        page.screenshot(path=str(shots / "demo-generate.png"), full_page=True)
        before = page.inner_text("#generate-speed")
        page.locator("#drafting").get_by_text("jacobi").click()  # training-free drafting, same page
        page.click("#generate-button")
        page.wait_for_function(f"() => document.querySelector('#generate-speed').innerText !== {before!r}",
                               timeout=120_000)
        _wait_idle(page)
        assert page.locator("#code-map .mm-drafted").count() >= 1
        assert "codes/s" in page.inner_text("#generate-speed")
        browser.close()


def _wait_idle(page) -> None:
    """Wait until no output shows a pending status tracker (gradio drops the `hide` class while one is pending)."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide')"
        " || e.offsetParent === null)", timeout=120_000)
