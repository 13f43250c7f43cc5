"""The web app: a real headless Chromium drives both tabs; 20 concurrent API requests."""

from __future__ import annotations

import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from concept_attention.app import MAX_CONCEPTS, clean_concepts, launch, UserInputError

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    port = free_port()
    demo = launch(str(tiny_model_dir), port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def embedded_server():
    """The app on the embedded default model, as `concept-attention app` serves it."""
    port = free_port()
    demo = launch(None, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_clean_concepts_follow_the_rule_of_every_front_end():
    assert clean_concepts(["dog", "sky, tree"]) == ["dog", "sky", "tree"]
    with pytest.raises(UserInputError, match="at least one"):
        clean_concepts([" "])
    with pytest.raises(UserInputError, match="duplicate concept 'Dog'"):  # as the CLI and the API refuse it
        clean_concepts(["dog", "Dog"])
    with pytest.raises(UserInputError, match=f"at most {MAX_CONCEPTS}"):
        clean_concepts([f"c{i}" for i in range(MAX_CONCEPTS + 1)])


def test_concurrent_api_requests(server, tmp_path):
    from gradio_client import Client, handle_file

    upload = tmp_path / "up.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8")).save(upload)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    concept_sets = [["dog"], ["dog", "tree"], ["dog", "tree", "sky"], ["car", "sky", "grass", "tree"]]

    def request(i: int):
        client = Client(server, verbose=False)
        kind = i % 5
        try:
            if kind == 4:  # invalid: no concepts / too many / corrupt upload / empty prompt
                bad = i % 4
                if bad == 0:
                    client.predict(prompt="a dog", concepts=[], seed=0, steps=2, width=32, height=32, api_name="/generate")
                elif bad == 1:
                    client.predict(prompt="a dog", concepts=[f"c{k}" for k in range(MAX_CONCEPTS + 2)], seed=0,
                                   steps=2, width=32, height=32, api_name="/generate")
                elif bad == 2:
                    client.predict(file=handle_file(str(corrupt)), concepts=["dog"], prompt="", timestep=0.5, samples=1,
                                   layer_start=2, layer_end=3, api_name="/explain")
                else:
                    client.predict(prompt="a dog", concepts=["dog"], seed=0, steps=2, width=30, height=32, api_name="/generate")
                return i, "no-error", None
            concepts = concept_sets[kind]
            if i % 2:
                result = client.predict(file=handle_file(str(upload)), concepts=concepts, prompt="", timestep=0.5,
                                        samples=1, layer_start=2, layer_end=3, api_name="/explain")
            else:
                result = client.predict(prompt=f"a scene {i}", concepts=concepts, seed=i, steps=2, width=32, height=32,
                                        api_name="/generate")
            return i, "ok", (concepts, result)
        except Exception as error:  # the client raises the app's readable message
            return i, "error", str(error)

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(request, range(20)))
    for i, status, payload in outcomes:
        if i % 5 == 4:
            assert status == "error", (i, status)
            assert any(s in payload for s in ("at least one concept", "at most", "Cannot use this upload",
                                              "multiples of")), payload
            assert "Traceback" not in payload and "/tmp" not in payload and " at 0x" not in payload
        else:
            assert status == "ok", (i, payload)
            concepts, (image, gallery, segmentation, cross, archive) = payload
            captions = [item["caption"] for item in gallery]
            assert captions == concepts  # this request's own maps, in its own order
            assert len(cross) == len(concepts)
            assert Path(image).is_file() and Path(segmentation).is_file() and archive.endswith(".zip")
    # the app still answers afterwards

    again = Client(server, verbose=False).predict(prompt="a dog", concepts=["dog", "sky"], seed=0, steps=2, width=32,
                                                  height=32, api_name="/generate")
    assert [item["caption"] for item in again[1]] == ["dog", "sky"]


def chromium_driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=options)


def wait_for_gallery(driver, gallery_id: str, count: int, timeout: float = 120) -> list:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        images = driver.find_elements(By.CSS_SELECTOR, f"#{gallery_id} img")
        loaded = [img for img in images if driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", img)]
        if len(loaded) >= count:
            return loaded
        time.sleep(0.5)
    raise AssertionError(f"{gallery_id} did not show {count} images within {timeout} s")


def require_browser() -> None:
    """Skip (with the reason) when Chromium is missing, unless CI asks for the browser test to be required."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    reason = ("the browser test needs Chromium and ChromeDriver (Debian: apt install chromium chromium-driver); "
              ".ci/run installs them")
    if os.environ.get("CONCEPT_ATTENTION_REQUIRE_BROWSER"):
        pytest.fail(reason + " and sets CONCEPT_ATTENTION_REQUIRE_BROWSER=1, so a missing browser fails there")
    pytest.skip(reason)


def test_browser_generate_and_explain(embedded_server, tmp_path):
    require_browser()
    server = embedded_server
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium_driver()
    try:
        driver.get(server)
        wait = time.time() + 60
        while not driver.find_elements(By.ID, "gen-button") and time.time() < wait:
            time.sleep(0.5)
        # Generate tab: type a custom prompt, keep the example's concepts, add one more
        prompt = driver.find_element(By.CSS_SELECTOR, "#gen-prompt input")
        prompt.send_keys(Keys.CONTROL, "a")
        prompt.send_keys("a red circle and a blue square on grass")
        prompt.send_keys(Keys.ENTER)
        concepts = driver.find_element(By.CSS_SELECTOR, "#gen-concepts input")
        concepts.send_keys("sky")
        concepts.send_keys(Keys.ENTER)
        concepts.send_keys(Keys.ESCAPE)  # close the option list
        driver.find_element(By.TAG_NAME, "h1").click()
        time.sleep(0.5)
        clicked = time.perf_counter()
        driver.find_element(By.ID, "gen-button").click()
        images = wait_for_gallery(driver, "gen-gallery", 6)
        print(f"first generate result in the browser after {time.perf_counter() - clicked:.1f} s")
        assert len(images) >= 6  # the example's 5 concepts + the added one
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(tmp_path / "generate.png"))
        if os.environ.get("CONCEPT_ATTENTION_SCREENSHOTS"):
            driver.save_screenshot(str(SCREENSHOTS / "app-generate.png"))
        # Explain tab: upload an RGBA PNG
        upload = tmp_path / "upload.png"
        Image.fromarray((np.random.default_rng(2).random((48, 64, 4)) * 255).astype("uint8"), "RGBA").save(upload)
        tab = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if "Explain" in b.text][0]
        tab.click()
        time.sleep(1)
        driver.find_element(By.CSS_SELECTOR, "#exp-upload input[type='file']").send_keys(str(upload))
        time.sleep(2)
        driver.find_element(By.ID, "exp-button").click()
        images = wait_for_gallery(driver, "exp-gallery", 5)
        assert len(images) >= 5
        driver.save_screenshot(str(tmp_path / "explain.png"))
        if os.environ.get("CONCEPT_ATTENTION_SCREENSHOTS"):
            driver.save_screenshot(str(SCREENSHOTS / "app-explain.png"))
    finally:
        driver.quit()


def test_the_api_has_named_endpoints_and_parameters(server):
    from gradio_client import Client

    endpoints = Client(server, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = {endpoint: [parameter["parameter_name"] for parameter in info["parameters"]]
             for endpoint, info in endpoints.items()}
    assert names["/generate"] == ["prompt", "concepts", "seed", "steps", "width", "height"]
    assert names["/explain"] == ["file", "concepts", "prompt", "timestep", "samples", "layer_start", "layer_end"]


def test_the_page_says_what_the_models_notice_says(tiny_model_dir):
    from concept_attention.app import build_app
    from concept_attention.loading import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir))
    texts = lambda demo: " ".join(str(getattr(block, "value", "")) for block in demo.blocks.values())
    assert "Note on this model" not in texts(build_app(pipe))
    pipe.concept_attention_defaults = {**pipe.concept_attention_defaults, "notice": "blocks 1 and 2 were trained"}
    assert "**Note on this model:** blocks 1 and 2 were trained" in texts(build_app(pipe))
