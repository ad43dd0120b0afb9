"""The service's web page in headless Chromium (selenium + Debian's chromium/chromium-driver):
choose or drop an image, read the top-k bars, see errors. .ci/install-extras.sh installs them."""
import base64
import os
import shutil

import pytest

from deploy_helpers import digit_images, running_server, torch_one_thread, trained_run  # noqa: F401

pytest.importorskip("fastapi", reason="the service needs fastapi (pip install resforge[serve])")
pytest.importorskip("uvicorn", reason="the service needs uvicorn (pip install resforge[serve])")
requests = pytest.importorskip("requests", reason="the tests talk HTTP with requests")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (.ci/install-extras.sh)")

CHROMIUM = os.environ.get("RESFORGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RESFORGE_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")     # selenium must not phone home
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    with running_server(run, "--threads", "1") as url:
        yield run, url


def _wait_for(driver, css: str, timeout: float = 20.0):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def _bars(driver) -> list[tuple[str, float]]:
    from selenium.webdriver.common.by import By
    rows = driver.find_elements(By.CSS_SELECTOR, "#results .row")
    return [(r.find_element(By.CSS_SELECTOR, ".label").text,
             float(r.find_element(By.CSS_SELECTOR, ".prob").text.rstrip("%"))) for r in rows]


def test_page_upload_shows_topk_bars(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    run, url = served
    name, data, _ = digit_images(run, 1)[0]
    path = tmp_path / name
    path.write_bytes(data)
    api = requests.post(f"{url}/v1/predict?topk=5", files={"file": (name, data)}).json()["predictions"][0]["topk"]

    browser.get(url + "/")
    _wait_for(browser, "#file")
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, 20).until(lambda d: "resnet20" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(path))
    _wait_for(browser, "#results .row .label")
    bars = _bars(browser)
    assert [label for label, _ in bars] == [t["label"] for t in api]          # same answer as the API
    assert bars[0][1] == pytest.approx(100 * api[0]["prob"], abs=0.06)
    width = browser.find_element(By.CSS_SELECTOR, "#results .row .fill").value_of_css_property("width")
    assert float(width.rstrip("px")) > 0


def test_page_drop_and_error_message(browser, served):
    run, url = served
    name, data, _ = digit_images(run, 2)[1]
    browser.get(url + "/")
    _wait_for(browser, "#drop")
    drop = """
        const [b64, name] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    """
    browser.execute_script(drop, base64.b64encode(data).decode(), name)
    _wait_for(browser, "#results .row .label")
    api = requests.post(f"{url}/v1/predict?topk=1", files={"file": (name, data)}).json()
    assert _bars(browser)[0][0] == api["predictions"][0]["topk"][0]["label"]

    browser.execute_script(drop, base64.b64encode(b"plain text, not a picture").decode(), "fake.png")
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, 20).until(lambda d: "not a supported image" in d.find_element("id", "error").text)
    assert _bars(browser) == []
