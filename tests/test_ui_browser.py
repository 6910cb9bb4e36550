"""UI tier: a real headless Chromium opens a tiny round's flow run in the real Prefect UI served by the test server.

It goes where a person would: the `dpo-round` flow run's page -> its Artifacts tab (the round's artifacts as cards)
-> the round report -> the report's own page, and asserts that the report's training-curves PNG, an inline
`data:image/png` URI, is really rendered (the <img> loaded, with the PNG's own width). Both the default (V2, React)
UI and the V1 (Vue) UI are checked. Screenshots go to `test-output/ui/` in the repository (git-ignored) and to the
test's tmp_path.

Setup installs what is missing (Debian's chromium and chromium-driver via apt-get when root, Selenium via pip) and
skips with the reason where it cannot; see tests/browser.py.
"""

from __future__ import annotations

import base64
import re

import httpx
import pytest

from selfplay.reporting.artifacts import KEYS
from tests.browser import ensure_chromium, ensure_selenium, make_driver, screenshot, wait_for
from tests.conftest import REPO, run_self_play, tiny_config

pytestmark = pytest.mark.stage

OUTPUT = REPO / "test-output" / "ui"
RUN_NAME = "ui-run"
ROUND_KEYS = [KEYS["summary"], KEYS["pairs"], KEYS["report"], KEYS["checkpoint"]]
DATA_PNG = re.compile(r"!\[training curves\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)")


def _ui_settings(api_url: str) -> dict:
    return httpx.get(f"{api_url.removesuffix('/api')}/ui-settings", timeout=10).json()


@pytest.fixture(scope="module")
def ui_api_url(prefect_server):
    """The session server; its UI learns where the API is from GET /ui-settings (PREFECT_UI_API_URL, set in
    conftest.py), and must call back to this very server."""
    assert _ui_settings(prefect_server).get("api_url", "").rstrip("/") == prefect_server
    return prefect_server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium()
    ensure_selenium()
    driver = make_driver(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ui_run(ui_api_url, tiny_model, tmp_path_factory):
    """One tiny round; returns the UI's base URL, the `dpo-round` flow run's id and its round-report artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    tmp = tmp_path_factory.mktemp("ui-runs")
    summaries = run_self_play(tiny_config(tiny_model, tmp, name=RUN_NAME, rounds=1), tmp / "ui-run.yaml")
    assert [s["round"] for s in summaries] == [1]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["dpo-round"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{RUN_NAME}-round-1"])),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
        assert runs, f"no dpo-round flow run named {RUN_NAME}-round-1"
        flow_run = runs[0]
        assert flow_run.state.is_completed()
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[KEYS["report"]]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    assert len(artifacts) == 1, artifacts
    report = artifacts[0]
    match = DATA_PNG.search(report.data)
    assert match, "the round report has no inline training-curves PNG"
    png = base64.b64decode(match.group(1).split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return {
        "base": ui_api_url.removesuffix("/api"), "flow_run_id": str(flow_run.id), "artifact_id": str(report.id),
        "data_uri": match.group(1), "png_size": (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")),
    }


RENDERED_IMG = """
const img = [...document.images].find(i => i.getAttribute('src') && i.getAttribute('src').startsWith('data:image/png'));
if (!img) return null;
return {src: img.getAttribute('src'), alt: img.alt, complete: img.complete, width: img.naturalWidth,
        height: img.naturalHeight, shown: img.getBoundingClientRect().width};
"""
IMG_STATE = """
return [...document.querySelectorAll('img')].map(i => ({src: (i.getAttribute('src') || '').slice(0, 40),
        alt: i.alt, width: i.naturalWidth}));
"""


def assert_image_rendered(driver, ui_run) -> dict:
    """The report's <img> carries the artifact's data URI unchanged and has loaded with the PNG's own size."""
    img = wait_for(driver, lambda d: (s := d.execute_script(RENDERED_IMG)) and s["complete"] and s["width"] > 0 and s,
                   "a loaded <img src='data:image/png...'>",
                   detail=lambda d: f"<img> elements in the DOM (a stripped data URI shows as an empty src): "
                                    f"{d.execute_script(IMG_STATE)}")
    assert img["alt"] == "training curves"
    assert img["src"] == ui_run["data_uri"], "the UI changed the image's data URI"
    assert (img["width"], img["height"]) == ui_run["png_size"]
    assert img["shown"] > 0, "the image is in the DOM but not laid out"
    return img


def show(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)


def click(driver, element) -> None:
    """A real (WebDriver) click, as a person's: Radix tabs in the V2 UI ignore a script's element.click()."""
    show(driver, element)
    element.click()


def visible_element(driver, css: str):
    return next((e for e in driver.find_elements("css selector", css) if e.is_displayed()), None)


def test_v2_ui_shows_the_round_report_and_renders_its_image(browser, ui_run, tmp_path):
    base, run_id, artifact_id = ui_run["base"], ui_run["flow_run_id"], ui_run["artifact_id"]
    assert "v2" in _ui_settings(base + "/api")["available_uis"]

    browser.get(f"{base}/v2/runs/flow-run/{run_id}")
    tab = wait_for(browser, lambda d: next((e for e in d.find_elements("css selector", "[role=tab]")
                                            if e.text.strip() == "Artifacts"), None), "the Artifacts tab")
    click(browser, tab)
    cards = {key: wait_for(browser, lambda d, key=key: visible_element(d, f"a[href$='/artifacts/key/{key}']"),
                           f"the {key} artifact card") for key in ROUND_KEYS}
    report_card = cards[KEYS["report"]]
    assert "MARKDOWN" in report_card.text and f"{RUN_NAME} round 1: report" in report_card.text
    assert "/v2/runs/flow-run/" in browser.current_url and "ui-run-round-1" in browser.find_element("tag name", "body").text
    show(browser, report_card)
    screenshot(browser, "v2-flow-run-artifacts.png", OUTPUT, tmp_path)

    click(browser, report_card)  # -> the key's page, listing every artifact with that key
    link = wait_for(browser, lambda d: visible_element(d, f"a[href$='/artifacts/artifact/{artifact_id}']"),
                    f"the link to artifact {artifact_id} on the key page")
    click(browser, link)
    wait_for(browser, lambda d: f"/v2/artifacts/artifact/{artifact_id}" in d.current_url, "the artifact page")
    wait_for(browser, lambda d: any(h.text.strip() == f"{RUN_NAME}: round 1" for h in d.find_elements("tag name", "h1")),
             "the report's heading")
    img = assert_image_rendered(browser, ui_run)
    show(browser, browser.find_element("css selector", "img[alt='training curves']"))
    paths = screenshot(browser, "v2-artifact-report.png", OUTPUT, tmp_path)
    print(f"V2 rendered the training curves at {img['width']}x{img['height']}: {paths}")


def test_v1_ui_shows_the_round_report_and_renders_its_image(browser, ui_run, tmp_path):
    base, run_id, artifact_id = ui_run["base"], ui_run["flow_run_id"], ui_run["artifact_id"]
    if "v1" not in _ui_settings(base + "/api")["available_uis"]:
        pytest.skip("this Prefect no longer serves the V1 UI")

    browser.get(f"{base}/runs/flow-run/{run_id}")
    tab = wait_for(browser, lambda d: next((e for e in d.find_elements("css selector", ".p-tab")
                                            if e.text.strip() == "Artifacts"), None), "the Artifacts tab")
    click(browser, tab)
    link = wait_for(browser, lambda d: visible_element(d, f"a[href$='/artifacts/artifact/{artifact_id}']"),
                    "the round report's card")
    assert KEYS["report"] in link.text and f"{RUN_NAME} round 1: report" in link.text
    body = browser.find_element("tag name", "body").text
    assert all(key in body for key in ROUND_KEYS), body
    show(browser, link)
    screenshot(browser, "v1-flow-run-artifacts.png", OUTPUT, tmp_path)

    click(browser, link)
    wait_for(browser, lambda d: d.current_url.rstrip("/").endswith(f"/artifacts/artifact/{artifact_id}"), "the artifact page")
    img = assert_image_rendered(browser, ui_run)
    show(browser, browser.find_element("css selector", "img[alt='training curves']"))
    paths = screenshot(browser, "v1-artifact-report.png", OUTPUT, tmp_path)
    print(f"V1 rendered the training curves at {img['width']}x{img['height']}: {paths}")


LAYOUT = """
const img = document.querySelector("img[alt='training curves']");
const rows = t => t ? [...t.rows].map(r => r.innerText.replace(/\\s+/g, ' ').trim()) : null;
const code = [...document.querySelectorAll('code')].find(c => !c.closest('.cm-editor') && c.textContent.endsWith('/checkpoint'));
const block = code && code.closest('p, td, li');
return {img_table_rows: img ? rows(img.closest('table')) : 'no image',
        checkpoint_block: block ? [block.tagName, block.textContent.trim().slice(0, 40)] : 'no checkpoint line'};
"""


def test_report_image_and_checkpoint_line_are_blocks_of_their_own(browser, ui_run):
    browser.get(f"{ui_run['base']}/v2/artifacts/artifact/{ui_run['artifact_id']}")
    assert_image_rendered(browser, ui_run)
    layout = browser.execute_script(LAYOUT)
    assert layout["img_table_rows"] is None, layout
    assert layout["checkpoint_block"][0] == "P" and layout["checkpoint_block"][1].startswith("Checkpoint:"), layout
