"""The service's web page in headless Chromium (selenium + Debian's chromium/chromium-driver):
choose or drop an image, read the top-k bars, see errors, and check the layout from the boxes
the browser computed (getBoundingClientRect): nothing overlaps, the result is under the drop zone.
scripts/install-browser.sh installs chromium. RESFORGE_PAGE_SCREENSHOTS=DIR also saves the screenshots
there; docs/serve-page.png is made with
    resforge train train.epochs=8 train.project=/tmp/runs train.name=digits8
    RESFORGE_PAGE_RUN=/tmp/runs/digits8 RESFORGE_PAGE_SCREENSHOTS=docs pytest tests/test_serve_browser.py
"""
import base64
import os
import shutil
from pathlib import Path

import pytest

from deploy_helpers import digit_images, png_bytes, running_server, torch_one_thread, trained_run  # noqa: F401

pytest.importorskip("fastapi", reason="the service needs fastapi (pip install resforge[serve])")
pytest.importorskip("uvicorn", reason="the service needs uvicorn (pip install resforge[serve])")
requests = pytest.importorskip("requests", reason="the tests talk HTTP with requests")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e .[test] (selenium)")

CHROMIUM = os.environ.get("RESFORGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RESFORGE_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=800,600", "--force-device-scale-factor=1"]
TIMEOUT = 20.0

# Each element's box as the browser laid it out, plus what is needed to judge it.
BOXES_JS = """
return arguments[0].map((sel) => {
  const el = document.querySelector(sel);
  if (!el) return null;
  const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
  return {sel, left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, height: r.height,
          display: cs.display, pieces: el.getClientRects().length,
          shown: r.width > 0 && r.height > 0 && cs.visibility !== "hidden" && el.closest("[hidden]") === null};
});
"""
# Images a user would see as a broken-image icon: displayed, but not (or not yet) decoded.
BROKEN_IMAGES_JS = """
return [...document.images].filter((im) => im.getClientRects().length > 0 && !(im.complete && im.naturalWidth > 0))
  .map((im) => im.outerHTML);
"""
DROP_JS = """
const [b64, name, type] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], name, {type}));
const event = new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
document.getElementById("drop").dispatchEvent(event);
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)):
        why = f"needs {CHROMIUM} and {CHROMEDRIVER}: bash scripts/install-browser.sh (Debian's chromium chromium-driver)"
        if os.environ.get("CI"):            # CI must run the page test, never pass by skipping it
            pytest.fail(why)
        pytest.skip(why)
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")     # selenium must not phone home
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    # An 800x600 viewport (the window is that plus its frame), the size of docs/serve-page.png.
    frame = driver.execute_script("return [outerWidth - innerWidth, outerHeight - innerHeight]")
    driver.set_window_size(800 + frame[0], 600 + frame[1])
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # RESFORGE_PAGE_RUN: serve another run folder (docs/serve-page.png: 8-epoch digits, 99.7% test top-1)
    run = Path(os.environ.get("RESFORGE_PAGE_RUN") or trained_run(tmp_path_factory))
    with running_server(run, "--threads", "1") as url:
        yield run, url


def _until(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(condition, message=f"waiting for {what}")


def _open(driver, url: str) -> dict:
    """Load the page, wait for the model line; returns GET /v1/model."""
    info = requests.get(f"{url}/v1/model").json()
    driver.get(url + "/")
    _until(driver, lambda d: info["architecture"] in d.find_element("id", "model").text, "the model line")
    return info


def _boxes(driver, *selectors: str) -> dict:
    return {b["sel"]: b for b in driver.execute_script(BOXES_JS, list(selectors)) if b is not None}


def _overlap(a: dict, b: dict) -> float:
    """Area (px²) shared by two boxes."""
    w = min(a["right"], b["right"]) - max(a["left"], b["left"])
    h = min(a["bottom"], b["bottom"]) - max(a["top"], b["top"])
    return max(w, 0) * max(h, 0)


def _inside(inner: dict, outer: dict, slack: float = 0.5) -> bool:
    return (inner["left"] >= outer["left"] - slack and inner["right"] <= outer["right"] + slack
            and inner["top"] >= outer["top"] - slack and inner["bottom"] <= outer["bottom"] + slack)


def _assert_layout(driver, *below: str) -> dict:
    """The drop zone is one wide block under the model line; the `below` parts are shown, under
    the drop zone, and no two of model line / drop zone / `below` parts share a pixel."""
    boxes = _boxes(driver, "#model", "#drop", "#file + label", *below)
    drop, model = boxes["#drop"], boxes["#model"]
    assert drop["display"] in ("block", "flex", "grid"), drop      # an inline box splits and wraps around
    assert drop["pieces"] == 1, drop
    assert drop["width"] > drop["height"] > 0, drop
    column = driver.execute_script("const m = getComputedStyle(document.querySelector('main'));"
                                   "return document.querySelector('main').clientWidth"
                                   " - parseFloat(m.paddingLeft) - parseFloat(m.paddingRight)")
    assert drop["width"] == pytest.approx(column, abs=1), (drop, column)   # the zone spans the column
    assert _inside(boxes["#file + label"], drop), boxes            # the picker button is in the zone
    assert model["shown"] and model["bottom"] <= drop["top"], (model, drop)
    for sel in below:
        assert boxes[sel]["shown"], boxes[sel]
        assert boxes[sel]["top"] >= drop["bottom"], (boxes[sel], drop)
    parts = [model, drop, *(boxes[s] for s in below)]
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert _overlap(a, b) < 1, (a, b)
    return boxes


def _bars(driver) -> list[tuple[str, float]]:
    rows = driver.find_elements("css selector", "#results .row")
    return [(r.find_element("css selector", ".label").text,
             float(r.find_element("css selector", ".prob").text.rstrip("%"))) for r in rows]


def _assert_bars(driver, topk: list[dict]) -> None:
    """The bars show the API's classes in its order, its percentages, and bar lengths to scale;
    each row lies inside the result list and rows do not overlap."""
    bars = _bars(driver)
    assert [label for label, _ in bars] == [t["label"] for t in topk]
    assert [p for _, p in bars] == pytest.approx([100 * t["prob"] for t in topk], abs=0.051)
    n = len(topk)
    rows = driver.execute_script(BOXES_JS, [f"#results .row:nth-child({i + 1})" for i in range(n)]
                                 + [f"#results .row:nth-child({i + 1}) .fill" for i in range(n)]
                                 + [f"#results .row:nth-child({i + 1}) .track" for i in range(n)])
    rows, fills, tracks = rows[:n], rows[n:2 * n], rows[2 * n:]
    results = _boxes(driver, "#results")["#results"]
    for i, (row, fill, track) in enumerate(zip(rows, fills, tracks)):
        assert _inside(row, results), (row, results)
        assert fill["width"] / track["width"] == pytest.approx(topk[i]["prob"], abs=0.01)
        if i:
            assert row["top"] >= rows[i - 1]["bottom"], (rows[i - 1], row)


def _screenshot(driver, tmp_path: Path, name: str) -> None:
    for folder in filter(None, [tmp_path, os.environ.get("RESFORGE_PAGE_SCREENSHOTS")]):
        path = Path(folder) / name
        assert driver.get_screenshot_as_file(str(path)), path
        assert path.stat().st_size < 150_000, (path, path.stat().st_size)


def test_page_layout_and_keyboard_before_upload(browser, served):
    _, url = served
    info = _open(browser, url)
    c, h, w = info["input_size"]
    line = browser.find_element("id", "model").text
    assert f"{info['num_classes']} classes" in line and f"{h}×{w}" in line
    _assert_layout(browser)
    hidden = _boxes(browser, "#error", "#result", "#preview")
    assert not any(b["shown"] for b in hidden.values()), hidden
    assert browser.execute_script(BROKEN_IMAGES_JS) == []
    # Keyboard: the first Tab reaches the (visually hidden) file input, which has a visible label.
    from selenium.webdriver.common.keys import Keys
    browser.find_element("tag name", "body").send_keys(Keys.TAB)
    assert browser.execute_script("return document.activeElement.id") == "file"
    assert browser.execute_script("return document.getElementById('file').labels[0].textContent").strip()


def test_page_upload_shows_topk_bars_below_the_drop_zone(browser, served, tmp_path):
    run, url = served
    name, data, _ = digit_images(run, 1)[0]
    path = tmp_path / name
    path.write_bytes(data)
    topk = requests.post(f"{url}/v1/predict?topk=5", files={"file": (name, data)}).json()["predictions"][0]["topk"]

    _open(browser, url)
    browser.find_element("id", "file").send_keys(str(path))
    _until(browser, lambda d: len(_bars(d)) == 5 and d.execute_script(
        "const im = document.getElementById('preview'); return im.complete && im.naturalWidth > 0"),
        "five bars and the decoded preview")
    _assert_bars(browser, topk)
    boxes = _assert_layout(browser, "#preview", "#results")
    assert boxes["#preview"]["bottom"] <= boxes["#results"]["top"] or \
        boxes["#preview"]["right"] <= boxes["#results"]["left"]          # beside or above, never on top
    assert browser.execute_script(BROKEN_IMAGES_JS) == []
    assert browser.find_element("id", "caption").text == name
    _screenshot(browser, tmp_path, "serve-page.png")

    # A phone-wide viewport: the bars move under the preview; still nothing overlaps.
    size = browser.get_window_size()
    browser.set_window_size(360, size["height"])
    try:
        _until(browser, lambda d: d.execute_script("return innerWidth") < 400, "the narrow viewport")
        boxes = _assert_layout(browser, "#preview", "#results")
        assert boxes["#preview"]["bottom"] <= boxes["#results"]["top"]
        assert boxes["#results"]["right"] <= browser.execute_script("return document.documentElement.clientWidth")
        _assert_bars(browser, topk)
        _screenshot(browser, tmp_path, "serve-page-narrow.png")
    finally:
        browser.set_window_size(size["width"], size["height"])


def test_page_rejected_upload_shows_the_server_error_and_no_broken_image(browser, served, tmp_path):
    run, url = served
    _open(browser, url)
    good_name, good, _ = digit_images(run, 2)[1]
    browser.execute_script(DROP_JS, base64.b64encode(good).decode(), good_name, "image/png")
    _until(browser, lambda d: len(_bars(d)) == 5, "the bars of a dropped image")

    # Not an image, under a name that would be markup if the page used innerHTML.
    bad_name, bad = "<b>fake</b>.png", b"hello, this is not a picture"
    expected = requests.post(f"{url}/v1/predict?topk=5", files={"file": (bad_name, bad)}).json()["error"]
    browser.execute_script(DROP_JS, base64.b64encode(bad).decode(), bad_name, "image/png")
    _until(browser, lambda d: d.find_element("id", "error").is_displayed(), "the error box")
    error = browser.find_element("id", "error")
    assert error.text == expected                                  # the server's words, shown as text
    assert browser.execute_script("return document.getElementById('error').children.length") == 0
    assert browser.execute_script(BROKEN_IMAGES_JS) == []
    assert not _boxes(browser, "#result")["#result"]["shown"]      # the earlier result went away
    assert _bars(browser) == []
    _assert_layout(browser, "#error")
    _screenshot(browser, tmp_path, "serve-page-error.png")

    # An image the server reads but Chromium cannot draw (PPM): bars, a note, no broken-image icon.
    ppm = png_bytes(200, size=(16, 16), mode="RGB", fmt="PPM")
    browser.execute_script(DROP_JS, base64.b64encode(ppm).decode(), "grey.ppm", "image/x-portable-pixmap")
    _until(browser, lambda d: len(_bars(d)) == 5 and d.find_element("id", "nopreview").is_displayed(),
           "the bars and the no-preview note")
    assert not browser.find_element("id", "error").is_displayed()
    assert browser.execute_script(BROKEN_IMAGES_JS) == []
    assert browser.find_element("id", "caption").text == "grey.ppm"
    _assert_layout(browser, "#nopreview", "#results")
    _screenshot(browser, tmp_path, "serve-page-nopreview.png")
