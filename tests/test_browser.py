"""The web page in a real headless Chromium against the real server (Debian chromium + chromedriver).

Skips with a clear message when Chromium or chromedriver is missing (`.ci/run` installs them, and on
CI a missing browser fails instead of skipping).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image
from service_process import running_server

from model.bundle import load_bundle
from model.engine import InferenceEngine
from model.preprocessing import open_image, preprocess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser tests: apt-get install chromium chromium-driver")
    pytest.skip(
        "Chromium or chromedriver is missing: apt-get install chromium chromium-driver", allow_module_level=True
    )

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[dev]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TOKEN = "browser-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("store"), {"RA_ADMIN_TOKEN": TOKEN}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def expected_top1(domain: str, image_bytes: bytes) -> str:
    from model.backbone import load_backbone
    from service.settings import DEMO_DIR

    backbone = load_backbone(DEMO_DIR / "backbone.safetensors")
    bundle = load_bundle(DEMO_DIR / f"{domain}.safetensors", backbone)
    engine = InferenceEngine(backbone, capacity=1)
    logits = engine.predict(preprocess(open_image(image_bytes), bundle.preprocessing)[None], engine.load(bundle))[0]
    return bundle.labels[int(np.argmax(logits))]


def test_classify_an_image_with_a_demo_domain(server, browser, tmp_path):
    image = tmp_path / "digit.png"
    canvas = np.zeros((64, 64), np.uint8)
    canvas[12:52, 28:36] = 255  # a "1"
    Image.fromarray(canvas).save(image)
    browser.get(server + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "domain")).options) > 0)
    Select(browser.find_element(By.ID, "domain")).select_by_value("digits")
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "classify").click()
    first_label = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#results .bar .label")))
    assert first_label.text == expected_top1("digits", image.read_bytes())
    assert browser.find_element(By.ID, "preview").get_attribute("hidden") is None
    rows = browser.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")
    assert {r.find_element(By.CSS_SELECTOR, "td").text for r in rows} >= {"digits", "fashion", "catsdogs"}
    assert console_errors(browser) == []


def test_bad_uploads_show_the_server_error(server, browser, tmp_path):
    browser.get(server + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "domain")).options) > 0)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a picture")
    browser.find_element(By.ID, "image").send_keys(str(not_an_image))
    browser.find_element(By.ID, "classify").click()
    error = wait.until(ec.visibility_of_element_located((By.ID, "predict-error")))
    assert "not_image" in error.text

    bad_bundle = tmp_path / "bad.safetensors"
    bad_bundle.write_bytes(b"\x80\x04not safetensors at all")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "bundle").send_keys(str(bad_bundle))
    browser.find_element(By.ID, "upload").click()
    admin_error = wait.until(ec.visibility_of_element_located((By.ID, "admin-error")))
    assert "422" in admin_error.text and "invalid_bundle" in admin_error.text


def test_upload_and_delete_a_bundle(server, browser, tmp_path):
    from service.settings import DEMO_DIR

    browser.get(server + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "domain")).options) > 0)
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(TOKEN)
    browser.find_element(By.ID, "bundle").send_keys(str(DEMO_DIR / "digits.safetensors"))
    browser.find_element(By.ID, "replace").click()
    browser.find_element(By.ID, "upload").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "admin-status"), "Registered digits version 2"))
    browser.execute_script("window.confirm = () => true;")
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Delete catsdogs']").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "admin-status"), "Deleted catsdogs"))
    domains = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "domain")).options]
    assert "catsdogs" not in domains and "digits" in domains


def test_phone_width_has_no_horizontal_scroll(server, browser):
    browser.set_window_size(390, 844)
    try:
        browser.get(server + "/")
        WebDriverWait(browser, 20).until(lambda d: len(Select(d.find_element(By.ID, "domain")).options) > 0)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        for field in ("domain", "top-k", "image", "token", "bundle"):
            label = browser.find_elements(By.CSS_SELECTOR, f"label[for='{field}']")
            assert label, f"#{field} has no label"
    finally:
        browser.set_window_size(1200, 1000)


def test_with_keys_the_page_shows_only_the_keys_domains_and_keeps_the_key_for_the_tab(tmp_path_factory, browser):
    import json

    from service.frontend.access import hash_key

    root = tmp_path_factory.mktemp("keyed")
    keys = root / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "fashion-team", "key_sha256": hash_key("key-fashion"), "domains": ["fashion", "digits"]},
                    {"name": "pets", "key_sha256": hash_key("key-pets"), "domains": ["cat*"]},
                ]
            }
        )
    )
    with running_server(root / "store", {"RA_API_KEYS_FILE": str(keys)}) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20)
        error = wait.until(ec.visibility_of_element_located((By.ID, "predict-error")))
        assert "401" in error.text  # no key yet: nothing listed

        def use_key(key: str) -> list[str]:
            field = browser.find_element(By.ID, "token")
            field.clear()
            field.send_keys(key)
            browser.find_element(By.ID, "use-key").click()
            wait.until(lambda d: len(Select(d.find_element(By.ID, "domain")).options) > 0)
            return [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "domain")).options]

        assert use_key("key-fashion") == ["digits", "fashion", "__all__"]
        rows = browser.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["digits", "fashion"]
        assert use_key("key-pets") == ["catsdogs"]

        browser.refresh()  # the key stays for this tab (session storage), and the list with it
        wait.until(lambda d: len(Select(d.find_element(By.ID, "domain")).options) > 0)
        assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "domain")).options] == ["catsdogs"]
        browser.execute_script("sessionStorage.clear()")


def load_page(browser, url: str) -> WebDriverWait:
    browser.get(url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "domain")).options) > 0)
    return wait


def test_no_preview_before_an_image_is_chosen(server, browser):
    load_page(browser, server)
    preview = browser.find_element(By.ID, "preview")
    assert preview.get_attribute("hidden") is not None
    # the `hidden` attribute must win over the stylesheet (no broken-image icon with its alt text)
    assert browser.execute_script("return getComputedStyle(arguments[0]).display", preview) == "none"
    assert not preview.is_displayed()


def test_adapters_table_fits_at_1280_with_the_delete_buttons_visible(server, browser):
    import httpx

    from service.settings import DEMO_DIR

    long_name = "a-rather-long-domain-name-for-the-table"  # a long name is cut, not widening the table
    response = httpx.post(
        server + "/adapters",
        headers={"Authorization": f"Bearer {TOKEN}"},
        data={"domain": long_name, "replace": "true"},
        timeout=60,
        files={"bundle": ("d.safetensors", (DEMO_DIR / "digits.safetensors").read_bytes())},
    )
    assert response.status_code in (200, 201), response.text
    browser.set_window_size(1280, 800)
    try:
        load_page(browser, server)
        fit = browser.execute_script("""
            const table = document.getElementById("adapters"), wrap = table.parentElement, box = wrap.getBoundingClientRect();
            return {table: table.scrollWidth, wrap: wrap.clientWidth, wrapScroll: wrap.scrollWidth,
                    page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
                    buttons: [...table.querySelectorAll("tbody button")].map((b) => {
                      const r = b.getBoundingClientRect(), x = (r.left + r.right) / 2, y = (r.top + r.bottom) / 2;
                      return {label: b.getAttribute("aria-label"), inViewport: r.left >= 0 && r.right <= innerWidth,
                              inWrap: r.left >= box.left && r.right <= box.right,
                              onTop: document.elementFromPoint(x, y) === b};
                    })};""")
        assert fit["table"] <= fit["wrap"] and fit["wrapScroll"] <= fit["wrap"], fit
        assert fit["page"] <= 0, fit
        assert len(fit["buttons"]) >= 2 and f"Delete {long_name}" in [b["label"] for b in fit["buttons"]], fit
        for button in fit["buttons"]:
            assert button["inViewport"] and button["inWrap"] and button["onTop"], button
        cell = browser.find_element(By.CSS_SELECTOR, f"#adapters tbody td[title='{long_name}']")
        assert cell.text == long_name  # whole in the DOM (and its title), only cut on screen
        assert browser.find_element(By.CSS_SELECTOR, f"button[aria-label='Delete {long_name}']").is_displayed()
    finally:
        browser.set_window_size(1200, 1000)
        httpx.delete(f"{server}/adapters/{long_name}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


@pytest.mark.parametrize("key", ["", "not-the-token"])
def test_an_upload_without_the_right_key_names_the_api_key_field(server, browser, key):
    from service.settings import DEMO_DIR

    wait = load_page(browser, server)
    token = browser.find_element(By.ID, "token")
    token.clear()  # the tab may still hold the key from an earlier test
    token.send_keys(key)
    browser.find_element(By.ID, "bundle").send_keys(str(DEMO_DIR / "digits.safetensors"))
    browser.find_element(By.ID, "replace").click()
    browser.find_element(By.ID, "upload").click()
    error = wait.until(ec.visibility_of_element_located((By.ID, "admin-error")))
    assert "401" in error.text and "unauthorized" in error.text
    assert error.text.count("API key field") == 1, error.text
    assert browser.find_element(By.ID, "admin-status").text == ""
    browser.execute_script("sessionStorage.clear()")


def test_train_a_domain_from_a_folder_watch_it_and_predict_with_it(server, browser, tmp_path):
    folder = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for label, level in (("dark", 20), ("light", 220)):
        (folder / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.integers(0, 30, (32, 32, 3)) + level, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    load_page(browser, server)
    browser.get_log("browser")  # what earlier tests left
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(TOKEN)
    browser.find_element(By.ID, "train-domain").send_keys("shapes")
    browser.find_element(By.ID, "train-folder").send_keys(str(folder))
    epochs = browser.find_element(By.ID, "train-epochs")
    epochs.clear()
    epochs.send_keys("3")
    browser.find_element(By.ID, "train").click()
    wait = WebDriverWait(browser, 180, poll_frequency=0.2)
    wait.until(lambda d: d.find_element(By.ID, "train-upload").get_attribute("value") == "1")
    seen = set()

    def chart_moves(d) -> bool:
        seen.add(d.find_element(By.ID, "train-chart").get_attribute("data-epochs"))
        return d.find_element(By.ID, "train-try").is_displayed()

    wait.until(chart_moves)
    assert "3" in seen and len(seen & {"1", "2"}) >= 1, seen  # the chart grew epoch by epoch
    assert float(browser.find_element(By.ID, "train-progress").get_attribute("value")) == 1.0
    assert "succeeded" in browser.find_element(By.ID, "train-status").text
    browser.find_element(By.ID, "train-try").click()
    assert Select(browser.find_element(By.ID, "domain")).first_selected_option.get_attribute("value") == "shapes"
    image = tmp_path / "probe.png"
    Image.fromarray(np.full((32, 32, 3), 230, np.uint8)).save(image)
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "classify").click()
    label = WebDriverWait(browser, 30).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "#results .bar .label"))
    )
    assert label.text in ("dark", "light")
    assert "shapes (v1)" in browser.find_element(By.CSS_SELECTOR, "#results h3").text
    assert console_errors(browser) == []
