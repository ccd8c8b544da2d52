"""The dashboard end to end in headless Chromium (Debian's, driven by Playwright): log in with
a key, upload a model and a dataset, start a job, watch its progress bar reach 100%, download
an artifact. Screenshots go to test-output/dashboard/."""

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.services import bert_upload, embedded_service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "dashboard"
if CHROMIUM is None and not os.environ.get(
    "CI"
):  # CI installs it (scripts/test): never skipped there
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with embedded_service(tmp_path_factory.mktemp("dashboard")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    assert CHROMIUM is not None, "CI installs chromium: scripts/test"
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.mark.slow  # a browser, a service and a whole job
def test_upload_submit_watch_and_download(
    service: tuple[str, str], browser: object, tmp_path: Path
) -> None:
    url, key = service
    archive, data = bert_upload(tmp_path)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(accept_downloads=True)  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.extend([m.text] if m.type == "error" else []))
    expect = sync_api.expect

    page.goto(url)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()

    page.get_by_role("navigation").get_by_role("link", name="Upload").click()
    page.get_by_label("Model file").set_input_files(str(archive))
    page.get_by_role("button", name="Upload model").click()
    expect(page.get_by_role("status")).to_contain_text("bert.zip is ready", timeout=60_000)
    page.get_by_label("Dataset file").set_input_files(str(data))
    page.get_by_role("button", name="Upload dataset").click()
    expect(page.get_by_role("status")).to_contain_text("data.safetensors is stored")

    page.get_by_role("navigation").get_by_role("link", name="New job").click()
    page.get_by_label("Target fraction kept").fill("0.7")
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Calibration batches").fill("1")
    page.get_by_label("Batch size").fill("16")
    page.get_by_label("safetensors").check()
    page.get_by_role("button", name="Start job").click()

    progress = page.get_by_role("progressbar")
    expect(progress).to_have_attribute("value", "100", timeout=120_000)
    expect(page.locator("#job-state")).to_have_text("succeeded")
    expect(page.get_by_role("heading", name="Pruning steps")).to_be_visible()
    expect(page.get_by_role("heading", name="Widths per layer")).to_be_visible()
    expect(page.locator("dl.spec")).to_contain_text("macs 0.7")  # a summary; JSON on request
    expect(page.locator("details pre")).to_be_hidden()
    page.get_by_text("Spec as JSON").click()
    expect(page.locator("details pre")).to_contain_text('"steps": 2')
    report = page.frame_locator("iframe.report")  # the HTML report's charts, sandboxed
    expect(report.get_by_role("heading", name=re.compile(r"MACs \(0\.\d+×\)"))).to_be_visible()
    page.screenshot(path=str(SHOTS / "job.png"), full_page=True)

    with page.expect_download() as download:
        page.get_by_role("button", name="Download model-hf.zip").click()
    saved = tmp_path / "model-hf.zip"
    download.value.save_as(saved)
    assert saved.stat().st_size > 1000

    page.get_by_role("navigation").get_by_role("link", name="Jobs").click()
    expect(page.locator("td.state-succeeded")).to_have_count(1)
    expect(page.get_by_role("progressbar")).to_have_attribute("value", "100")
    expect(page.get_by_role("cell", name="macs 0.7", exact=True)).to_be_visible()  # not "batch 1"
    page.screenshot(path=str(SHOTS / "jobs.png"), full_page=True)
    assert errors == []


def test_a_wrong_key_is_turned_away(service: tuple[str, str], browser: object) -> None:
    url, _ = service
    page = browser.new_page()  # type: ignore[attr-defined]

    page.goto(url)
    page.get_by_label("API key").fill("apo_wrong")
    page.get_by_role("button", name="Log in").click()

    sync_api.expect(page.get_by_role("status")).to_have_text(re.compile("not accepted"))
    sync_api.expect(page.get_by_label("API key")).to_be_visible()


def test_the_page_forbids_inline_scripts_and_framing(service: tuple[str, str]) -> None:
    import httpx

    url, _ = service
    headers = httpx.get(url).headers
    policy = headers["content-security-policy"]

    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert headers["x-content-type-options"] == "nosniff"
