"""The demo page (`app.py`): its request handler on bad input, and the real page in a headless Chromium.

The browser test starts `python app.py` on 127.0.0.1 (a free port) with a tiny visual model whose random detector
always finds objects, drives Debian's Chromium through Selenium (`/usr/bin/chromium`, `/usr/bin/chromedriver`):
types a tweet, attaches an image, submits, and checks that the entities, their links to boxes and the boxed image
appear; then bad input through the page. It skips, saying why, only when no browser (or Selenium/Gradio) is
installed (`.ci/run` installs them).
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from fixtures import PROJECT, run_without_project
from grounding_builders import TEXT, blocks_image, write_tiny_grounding_folder


sys.path.insert(0, PROJECT)
import app  # noqa: E402  (the top-level demo script)


# where .ci/run finds them (on PATH), else Debian's paths; PMNER_CHROMIUM / PMNER_CHROMEDRIVER override
CHROMIUM = os.environ.get("PMNER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("PMNER_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 60  # seconds: the longest wait for the app to serve, or for one answer in the page


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return write_tiny_grounding_folder(tmp_path_factory.mktemp("demo"))


# The tiny model's TCFM attention is untrained (close to uniform), so the default bar (25 % above uniform) links
# no entity to a box: the page tests ask for every entity to be linked (threshold 0), as the screenshot's app does.
@pytest.fixture(scope="module")
def demo(demo_folder):
    return app.Demo(app.load_model(demo_folder), grounding_threshold=0.0)


def test_the_default_threshold_links_nothing_on_untrained_attention(demo, demo_folder, tmp_path):
    photo = tmp_path / "photo.png"
    blocks_image(320, 240).save(photo)
    tweet, picture, details = app.Demo(demo.pipe).answer(TEXT, str(photo))
    assert tweet.count('class="pmner-entity"') == len(TEXT.split()) and picture is not None  # boxes still drawn
    assert "box " not in tweet and details.count("not grounded") == len(TEXT.split())


# ----------------------------------------------------------------------------------------------------------------------
# The handler, on every kind of bad input (no browser needed)
# ----------------------------------------------------------------------------------------------------------------------


def test_an_answer_has_highlighted_entities_a_boxed_image_and_their_links(demo, tmp_path):
    photo = tmp_path / "photo.png"
    blocks_image(320, 240).save(photo)
    tweet, picture, details = demo.answer(TEXT, str(photo))
    assert tweet.count('class="pmner-entity"') == len(TEXT.split())  # the tiny model tags every word
    assert "box " in tweet and details.count('class="pmner-row"') == len(TEXT.split())
    assert picture.size == (320, 240) and picture.tobytes() != Image.open(photo).convert("RGB").tobytes()  # boxes drawn
    assert "no grounding supervision" in details and "answered in" in details


def test_empty_and_overlong_tweets_get_a_message(demo):
    for empty in ("", "   \n ", None):
        tweet, picture, details = demo.answer(empty, None)
        assert (tweet, picture) == ("", None) and "the text is empty" in details
    tweet, picture, details = demo.answer("word " * (app.MAX_CHARACTERS // 4), None)
    assert tweet == "" and f"at most {app.MAX_CHARACTERS:,}" in details


def test_a_thousand_word_tweet_is_tagged_in_windows_with_a_note(demo):
    text = " ".join(["trump", "visits", "london"] * 334)
    tweet, _, details = demo.answer(text, None)
    assert tweet.count('class="pmner-entity"') == len(text.split()) == 1002  # every word of every window
    assert "overlapping windows" in details


def test_unreadable_and_huge_images_are_reported_and_the_text_is_still_tagged(demo, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    tweet, picture, details = demo.answer(TEXT, str(broken))
    assert picture is None and "broken.jpg could not be used" in details and "text alone" in details
    assert tweet.count('class="pmner-entity"') == len(TEXT.split()) and "box " not in tweet
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)  # 100 M pixels (a few KB on disk), over the 89 M guard
    tweet, picture, details = demo.answer(TEXT, str(huge))
    assert picture is None and "huge.png could not be used" in details and "pixels" in details
    assert tweet.count('class="pmner-entity"') == len(TEXT.split())
    missing = tmp_path / "gone.png"
    assert "gone.png could not be used" in demo.answer(TEXT, str(missing))[2]


def test_a_processor_that_raises_on_bad_images_still_gives_the_text_result(demo, tmp_path, monkeypatch):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    monkeypatch.setattr(demo.pipe.processor.image_processor, "on_bad_image", "error")
    tweet, picture, details = demo.answer(TEXT, str(broken))
    assert picture is None and "broken.jpg could not be used" in details and "text alone" in details
    assert tweet.count('class="pmner-entity"') == len(TEXT.split())


def test_boxes_thinner_than_a_pixel_are_drawn_and_a_drawing_failure_keeps_the_entities(demo, tmp_path, monkeypatch):
    image = Image.new("RGB", (4000, 3000), "white")
    image.info["pmner_scale"] = 0.2  # shown at 800 x 600: a 3-pixel box is 0.6 display pixels wide
    thin = [{"slot": 0, "box": [100.0, 100.0, 103.0, 900.0], "label": "person", "score": 0.99}]
    drawn = app._draw(image, thin, [])
    assert drawn.size == (4000, 3000) and drawn.tobytes() != image.tobytes()

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(app, "_draw", broken)
    photo = tmp_path / "photo.png"
    blocks_image(320, 240).save(photo)
    tweet, picture, details = demo.answer(TEXT, str(photo))
    assert picture is None and "The boxes could not be drawn (ValueError: cannot draw)" in details
    assert tweet.count('class="pmner-entity"') == len(TEXT.split()) and "box " in tweet


def test_long_captions_are_cut_to_their_box_and_never_cover_each_other():
    from PIL import ImageDraw, ImageFont

    image = Image.new("RGB", (800, 600), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=18)
    names = ", ".join(f"Entity number {index} of a long tweet" for index in range(12))
    caption = app._fit(draw, font, f"3 person <- {names}", 200)
    assert caption.startswith("3 person <- Entity") and caption.endswith("...")
    assert draw.textlength(caption, font=font) <= 200
    assert app._fit(draw, font, "1 dog", 200) == "1 dog"
    taken = []
    for _ in range(4):  # four objects with the same top-left corner, near the bottom right of the picture
        x, y = app._caption_place(draw, font, caption, (700.0, 500.0), taken, image.size)
        left, top, right, bottom = draw.textbbox((x, y), caption, font=font)
        assert 0 <= left and right <= 800 and 0 <= top and bottom <= 600
        assert not any(left - 1 < other[2] and other[0] < right + 1 and top - 1 < other[3] and other[1] < bottom + 1
                       for other in taken)
        taken.append((left - 1, top - 1, right + 1, bottom + 1))
    objects = [{"slot": slot, "box": [10.0, 10.0, 90.0, 90.0], "label": "person", "score": 0.99} for slot in range(5)]
    entities = [{"word": f"Entity {slot} with a long name", "grounding": {"slot": slot}} for slot in range(5)]
    pixels = np.asarray(app._draw(image, objects, entities))
    for slot in range(5):  # each caption's colour is still visible: none was drawn over
        colour = [int(app._slot_colour(slot)[i:i + 2], 16) for i in (1, 3, 5)]
        assert int((pixels == colour).all(axis=-1).sum()) > 200, slot


def test_a_folder_that_is_not_a_model_exits_2_naming_the_argument(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert app.main(["--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"--model {tmp_path}: cannot load it" in error and "Traceback" not in error
    assert app.main(["--model", str(tmp_path / "missing")]) == 2
    assert f"--model {tmp_path / 'missing'}: no such folder" in capsys.readouterr().err


def test_a_text_only_model_says_the_image_is_not_used(tmp_path):
    from fixtures import write_tiny_masked_lm
    from pipeline_builders import build_model, build_processor, force_tag, save_folder

    text_model = write_tiny_masked_lm(tmp_path / "tiny-bert")
    model = force_tag(build_model(text_model, use_visual=False), "B-LOC")
    folder = save_folder(tmp_path / "text-only", model, build_processor(text_model, model))
    photo = tmp_path / "photo.png"
    blocks_image().save(photo)
    tweet, picture, details = app.Demo(app.load_model(folder)).answer("trump visits london", str(photo))
    assert picture is None and "text-only: the image is not used" in details
    assert tweet.count('data-type="LOC"') == 3 and "box " not in tweet


def test_a_failing_model_gives_a_message_not_an_exception(demo, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(demo, "pipe", broken)
    tweet, picture, details = demo.answer(TEXT, None)
    assert (tweet, picture) == ("", None) and "Something went wrong: RuntimeError: out of memory" in details


def test_the_space_runs_the_page_from_the_model_folder_code_alone(demo_folder, tmp_path):
    """As on a Space: app.py copied beside nothing of this project, the model's own code loaded
    (`--trust-remote-code`); without that flag a clear error says what to pass."""
    shutil.copy(os.path.join(PROJECT, "app.py"), tmp_path / "app.py")
    blocks_image(320, 240).save(tmp_path / "photo.png")
    script = f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import app
        try:
            app.load_model({demo_folder!r})
        except SystemExit as error:
            refusal = str(error)
        demo = app.Demo(app.load_model({demo_folder!r}, trust_remote_code=True), grounding_threshold=0.0)
        tweet, picture, details = demo.answer({TEXT!r}, {str(tmp_path / "photo.png")!r})
        print("RESULT " + json.dumps({{"refusal": refusal, "tweet": tweet, "size": picture.size, "details": details,
                                      "class": type(demo.pipe).__module__}}))
    """
    completed = run_without_project(script, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    assert "pass --trust-remote-code" in result["refusal"]
    assert result["class"].startswith("transformers_modules.")  # the folder's code
    assert result["tweet"].count('class="pmner-entity"') == len(TEXT.split()) and "box " in result["tweet"]
    assert result["size"] == [320, 240] and "attention" in result["details"]


def test_bad_command_lines_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("PMNER_MODEL", raising=False)
    assert app.main([]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert app.main(["--model", "x", "--grounding-threshold", "-1"]) == 2
    assert "--grounding-threshold must be a number >= 0" in capsys.readouterr().err
    assert app.main(["--model", "x", "--grounding-threshold", "nan"]) == 2
    assert "--grounding-threshold must be a number >= 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# The page in a real browser
# ----------------------------------------------------------------------------------------------------------------------


def browser_or_skip():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.isfile(path)]
    if missing:
        pytest.skip(
            f"no browser: {', '.join(missing)} not installed (apt-get install chromium chromium-driver; .ci/run does)"
        )
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed: pip install -e '.[demo]'")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(demo_folder, tmp_path):
    """`python app.py` on 127.0.0.1, its URL; stopped afterwards (terminate, then kill)."""
    browser_or_skip()
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, os.path.join(PROJECT, "app.py"), "--model", demo_folder, "--host", "127.0.0.1",
         "--port", str(port), "--threads", "1", "--grounding-threshold", "0"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not serve {url} within {WAIT} s:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "process": process, "log": tmp_path / "app.log"}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.fixture
def browser():
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # the page re-renders its blocks while it answers: an element found a moment ago may be gone, so look again
    ignored = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2, ignored_exceptions=ignored).until(condition)
    except TimeoutException:
        pytest.fail(f"the page did not show {what} within {WAIT} s; it shows:\n{driver.find_element('tag name', 'body').text[-2000:]}")


def submit(driver, text: str, image: str | None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#pmner-text textarea")
    box.send_keys(Keys.CONTROL, "a")  # typed, not set: the page sees the change
    box.send_keys(Keys.DELETE)
    if text:
        box.send_keys(text)
    clear = driver.find_elements(By.CSS_SELECTOR, "#pmner-image button[aria-label='Clear']")
    if clear:  # a file attached by an earlier request
        clear[0].click()
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#pmner-image input[type=file]"), "an empty file input")
    if image:
        driver.find_element(By.CSS_SELECTOR, "#pmner-image input[type=file]").send_keys(image)
        name = os.path.basename(image)
        wait_for(driver, lambda d: name in d.find_element(By.CSS_SELECTOR, "#pmner-image").text.replace("\n", ""), f"{name} attached")
    before = driver.find_element(By.CSS_SELECTOR, "#pmner-details").text
    driver.find_element(By.CSS_SELECTOR, "#pmner-submit").click()
    # every answer ends with its time; the page's loading indicator changes the block too, so wait for that line
    wait_for(
        driver,
        lambda d: (text := d.find_element(By.CSS_SELECTOR, "#pmner-details").text) != before and "answered in" in text,
        "an answer",
    )


def test_the_page_tags_a_tweet_with_its_image_in_a_real_browser(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    photo = tmp_path / "photo.png"
    blocks_image(320, 240).save(photo)
    started = time.perf_counter()
    browser.get(served["url"])
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#pmner-text textarea"), "the tweet box")
    load_seconds = time.perf_counter() - started

    submit(browser, TEXT, str(photo))
    marks = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#pmner-output mark.pmner-entity"), "entities")
    assert [mark.text.split("\n")[0].split(" ")[0].replace("PER", "") for mark in marks] == TEXT.split()
    assert all(mark.get_attribute("data-type") == "PER" for mark in marks)
    links = browser.find_elements(By.CSS_SELECTOR, "#pmner-output mark.pmner-entity .pmner-box")
    assert len(links) == len(marks) and all(link.text.startswith("box ") for link in links)  # every entity linked
    rows = browser.find_elements(By.CSS_SELECTOR, "#pmner-details td.pmner-grounding")
    assert len(rows) == len(marks) and all("attention" in row.text for row in rows)

    # the boxed image: shown, loaded, and holding the colour of the box that the first entity is linked to
    source = wait_for(
        browser,
        lambda d: d.execute_script(
            "const image = document.querySelector('#pmner-picture img');"
            "return image && image.complete && image.naturalWidth > 0 && image.src"
        ),
        "the boxed image, loaded",
    )
    with urllib.request.urlopen(source, timeout=10) as response:
        shown = Image.open(io.BytesIO(response.read())).convert("RGB")
    assert shown.size == (320, 240)
    slot = int(links[0].text.split()[1]) - 1
    colour = tuple(int(app._slot_colour(slot)[index : index + 2], 16) for index in (1, 3, 5))
    def pixels_of(image) -> int:
        return int((np.asarray(image.convert("RGB")) == np.array(colour, dtype=np.uint8)).all(-1).sum())

    assert pixels_of(Image.open(photo)) == 0 and pixels_of(shown) > 20  # that box is drawn

    screenshot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

    # bad input through the page: a message, and the app keeps serving
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    submit(browser, TEXT, str(broken))
    # the details block may still show the previous answer for a moment (the page re-renders it): wait, bounded
    wait_for(browser, lambda d: "broken.jpg could not be used" in (text := d.find_element(By.CSS_SELECTOR, "#pmner-details").text)
             and "text alone" in text, "the unreadable image's message")
    # the page updates its output blocks one after the other: wait for the entities, bounded
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pmner-output mark.pmner-entity")) == len(TEXT.split()),
             f"{len(TEXT.split())} entities of the text alone")
    submit(browser, "", None)
    wait_for(browser, lambda d: "the text is empty" in d.find_element(By.CSS_SELECTOR, "#pmner-details").text,
             "the empty tweet's message")
    submit(browser, "trump visits london", None)
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pmner-output mark.pmner-entity")) == 3,
             "the 3 entities of 'trump visits london'")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert served["process"].poll() is None, "the app stopped serving"
    # nothing but the app was fetched by the page (no web fonts, no analytics)
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
    assert fetched and all(name.startswith(served["url"]) or name.startswith("data:") or name.startswith("blob:") for name in fetched), fetched
    print(f"page load {load_seconds:.2f} s")
