"""The playground in a real browser: headless chromium (Debian's chromium + chromium-driver, driven by selenium with
the driver's path given, so nothing is downloaded) opens the page served on loopback with tiny untrained exports,
types a prompt, clicks Generate and finds the kept images and their scores. `make test-browser` runs it (the main
suite leaves tests/browser out); without chromium it skips, saying what to install.

Also a screenshot tool for a server already running (the README's docs/playground.png):

    python tests/browser/test_playground_browser.py --url http://127.0.0.1:7860/ --prompt "a large green square on the right" \\
        --backend AR --candidates 16 --keep 4 --out docs/playground.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# offline and as root: no sandbox, no background traffic towards a network that is not there
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000", "--hide-scrollbars"]


def open_browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def clear(field) -> None:
    """Empty an input the way a user does (select all, delete), so the page sees the change (.clear() may not)."""
    from selenium.webdriver.common.keys import Keys

    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE)


def generate_in_page(driver, url: str, prompt: str, backend: str | None = None, candidates: int | None = None,
                     keep: int | None = None, timeout: float = 120) -> str:
    """Open the page, type `prompt`, pick the backend and the counts, click Generate; the status text once the
    kept images are shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    clear(box)
    box.send_keys(prompt)
    if backend is not None:
        driver.find_element(By.XPATH, f"//*[@id='backend']//label[normalize-space()='{backend}']").click()
    for elem_id, value in (("candidates", candidates), ("keep", keep)):
        if value is not None:
            field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
            clear(field)
            field.send_keys(str(value))
            field.send_keys("\t")  # commit the value
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: "candidates in" in d.find_element(By.ID, "status").text)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ar_gallery img, #unclip_gallery img"))
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)  # let the images paint before a screenshot
    return driver.find_element(By.ID, "status").text


# -- the test ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def driver():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"no browser: {CHROMIUM} and {CHROMEDRIVER} missing (apt-get install chromium chromium-driver; "
                    f"`make test-browser` does)")
    pytest.importorskip("selenium", reason="selenium missing: pip install -e '.[browser]' (`make test-browser` does)")
    profile = tempfile.mkdtemp(prefix="dalle-ar-chromium-")
    d = open_browser(profile)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from conftest import tiny_exports

    from dalle_ar.playground.app import Playground, build_app, launch

    e = tiny_exports(tmp_path_factory.mktemp("browser"), vocab_size=400, text_len=16, image_fmap_size=16)
    play = Playground.load(str(e["dalle"]), str(e["clip"]), str(e["prior"]), str(e["decoder"]))
    demo = build_app(play, batch_size=8)
    try:
        yield launch(demo, "127.0.0.1", _free_port(), block=False)
    finally:
        demo.close()


def test_typed_prompt_shows_ranked_images_in_the_browser(driver, url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from dalle_ar.playground.app import EXAMPLES

    status = generate_in_page(driver, url, EXAMPLES[3], backend="both", candidates=4, keep=2)
    assert "AR: 4 candidates in" in status and "unCLIP: 4 candidates in" in status
    for gallery in ("ar_gallery", "unclip_gallery"):
        images = driver.find_elements(By.CSS_SELECTOR, f"#{gallery} img")
        assert len(images) == 2, gallery
        assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im) >= 192
                   for im in images)
    assert "CLIP" in driver.find_element(By.ID, "ar_gallery").text  # the captions carry the scores
    driver.save_screenshot(str(tmp_path / "page.png"))

    clear(driver.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    driver.find_element(By.ID, "generate").click()  # an empty prompt: a message in the page, not a trace
    try:
        WebDriverWait(driver, 30).until(lambda d: "empty prompt" in d.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.save_screenshot(str(tmp_path / "empty.png"))
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text


# -- the screenshot tool --------------------------------------------------------------------------------------
if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="a running playground (make play prints it)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--backend", default=None, help="AR, unCLIP or both (default: the page's)")
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--keep", type=int, default=None)
    p.add_argument("--size", default="1400,1000", help="window width,height")
    p.add_argument("--out", default="docs/playground.png")
    args = p.parse_args()
    FLAGS = [f for f in FLAGS if not f.startswith("--window-size")] + [f"--window-size={args.size}"]
    with tempfile.TemporaryDirectory(prefix="dalle-ar-chromium-") as profile:
        d = open_browser(profile)
        try:
            print(generate_in_page(d, args.url, args.prompt, args.backend, args.candidates, args.keep, timeout=600))
            d.save_screenshot(args.out)
        finally:
            d.quit()
    print(f"wrote {args.out}")
