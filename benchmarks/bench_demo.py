"""Speed of the demo page (`app.py`) as a person sees it, in headless Chromium (Selenium), and FRR time per image.

    python benchmarks/bench_demo.py --model outputs/speed-model --tweets 50
    python benchmarks/bench_demo.py --frr-only

Starts `python app.py --model MODEL --threads N` on 127.0.0.1 and prints:
- app start: process start until the page is served (model load and one warm-up answer included);
- first page load: a fresh browser's navigation until the tweet box is shown (and the browser's load event);
- answer: click on "Find entities" until the entities are shown, per tweet (the first Twitter-2017 test tweets,
  text only), median / p95 / max, and the handler's own time ("answered in");
- FRR per image: the image processor with its default settings and random torchvision weights (Faster R-CNN
  R50-FPN v2 + ResNet-152) on a 640 x 480 image (the random detector finds objects above 0.95 on it: 5 crops).
Needs the `demo` extra and Chromium (`/usr/bin/chromium`, `/usr/bin/chromedriver`).

    python benchmarks/bench_demo.py --screenshot docs/demo.png --model outputs/speed-model

writes the README's screenshot instead: the page answering a tweet with an image, served by an illustration model
built from the text-only MODEL (its encoder and prompt head, so its entities are the trained model's) with fusion
layers whose outputs are zero (tags unchanged; their attention, hence the grounding, is untrained) and a small FRR
with random weights (mobilenet Faster R-CNN at score threshold 0, ResNet-18): the boxes, labels and links show what
the page does, not what a trained visual model sees.
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
TEST_FILE = os.path.join(PROJECT, "..", "shared", "data", "twitter2017", "test.txt")


def tweets_of(path: str, count: int) -> list[str]:
    tweets, words = [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if line.startswith("IMGID:"):
                continue
            if not line.strip():
                if words:
                    tweets.append(" ".join(words))
                    words = []
                    if len(tweets) == count:
                        break
                continue
            words.append(line.split("\t")[0])
    return tweets


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def bench_page(args) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    app = subprocess.Popen(
        [sys.executable, os.path.join(PROJECT, "app.py"), "--model", args.model, "--port", str(port),
         "--threads", str(args.threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    driver = None
    try:
        while True:
            if app.poll() is not None:
                raise SystemExit(f"app.py exited with {app.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
            if time.perf_counter() - started > 300:
                raise SystemExit("app.py did not serve within 300 s")
        print(f"app start (model load, warm-up, server): {time.perf_counter() - started:.2f} s")
        options = Options()
        options.binary_location = args.chromium
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", "--disable-background-networking"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
        wait = WebDriverWait(driver, 60, poll_frequency=0.01)
        started = time.perf_counter()
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pmner-text textarea"))
        shown = time.perf_counter() - started
        load_event = driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime"
        )
        print(f"first page load: tweet box shown after {shown:.2f} s (browser load event at {load_event / 1000:.2f} s)")
        round_trips, handler = [], []
        for tweet in tweets_of(TEST_FILE, args.tweets):
            box = driver.find_element(By.CSS_SELECTOR, "#pmner-text textarea")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.DELETE)
            box.send_keys(tweet)
            details = driver.find_element(By.CSS_SELECTOR, "#pmner-details")
            before = details.text
            started = time.perf_counter()
            driver.find_element(By.CSS_SELECTOR, "#pmner-submit").click()
            wait.until(lambda d: (text := details.text) != before and "answered in" in text)
            round_trips.append(time.perf_counter() - started)
            match = re.search(r"answered in ([0-9.]+) s", driver.find_element(By.CSS_SELECTOR, "#pmner-details").text)
            handler.append(float(match.group(1)))
        print(
            f"answer, click to entities shown ({len(round_trips)} tweets): median {statistics.median(round_trips):.3f} s, "
            f"p95 {percentile(round_trips, 0.95):.3f} s, max {max(round_trips):.3f} s; model part (handler) median "
            f"{statistics.median(handler):.3f} s, max {max(handler):.3f} s"
        )
    finally:
        stop(driver, app)


def stop(driver, app) -> None:
    """Closes the browser (when one was started) and the app process (killed after 10 s)."""
    if driver is not None:
        driver.quit()
    app.terminate()
    try:
        app.wait(timeout=10)
    except subprocess.TimeoutExpired:
        app.kill()


def write_illustration_folder(text_model: str, folder: str) -> str:
    """The screenshot's model (see the module docstring), saved with its processor and pipeline in `folder`."""
    import torch

    sys.path.insert(0, PROJECT)
    from modeling_pmner import PMNERConfig, PMNERForTokenClassification
    from processing_pmner import PMNERImageProcessor, PMNERProcessor
    from processing_pmner.pipeline_pmner import add_pipeline_to_folder

    text_only = PMNERForTokenClassification.from_pretrained(text_model)
    settings = text_only.config.to_dict()
    settings.update(use_visual=True, visual_feature_dim=512, max_objects=5)
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "custom_pipelines"):
        settings.pop(key, None)
    torch.manual_seed(0)
    model = PMNERForTokenClassification(PMNERConfig(**settings))
    missing = model.load_state_dict(text_only.state_dict(), strict=False).missing_keys
    assert all(".fusion." in key or "visual" in key for key in missing), missing
    with torch.no_grad():  # V' = C = 0: H = T (eq. 8), the text-only model's tags
        for layer in (model.pmner.fusion.text_to_visual.output, model.pmner.fusion.text_to_fused.output):
            layer.weight.zero_()
            layer.bias.zero_()
    text_processor = PMNERProcessor.from_pretrained(text_model)
    image_processor = PMNERImageProcessor(
        detector="fasterrcnn_mobilenet_v3_large_320_fpn", detector_weights="random:0",
        detector_kwargs={"box_score_thresh": 0.0}, score_threshold=0.0, backbone="resnet18",
        backbone_weights="random:0", max_objects=5,
    )
    processor = PMNERProcessor(
        image_processor, text_processor.tokenizer, label_names=text_processor.label_names,
        max_length=text_processor.max_length,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    add_pipeline_to_folder(folder)
    return folder


def scene(path: str) -> None:
    """A 640 x 400 drawing (sky, field, a player, a ball, a stand) for the screenshot."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 400), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 250, 640, 400], fill=(70, 150, 70))
    draw.rectangle([420, 120, 620, 260], fill=(160, 60, 50))
    draw.ellipse([150, 60, 210, 120], fill=(230, 190, 160))
    draw.rectangle([140, 120, 220, 260], fill=(200, 30, 40))
    draw.rectangle([150, 260, 175, 340], fill=(40, 40, 90))
    draw.rectangle([185, 260, 210, 340], fill=(40, 40, 90))
    draw.ellipse([260, 300, 300, 340], fill=(240, 130, 30))
    image.save(path)


def screenshot(args) -> None:
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    work = tempfile.mkdtemp(prefix="pmner-screenshot-")
    folder = write_illustration_folder(args.model, os.path.join(work, "model"))
    picture = os.path.join(work, "photo.png")
    scene(picture)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    app = subprocess.Popen(
        [sys.executable, os.path.join(PROJECT, "app.py"), "--model", folder, "--port", str(port),
         "--threads", str(args.threads), "--grounding-threshold", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
    )
    driver = None
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if app.poll() is not None:
                    raise SystemExit(f"app.py exited with {app.returncode}")
                time.sleep(0.5)
        options = Options()
        options.binary_location = args.chromium
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,1000",
                         "--force-device-scale-factor=1"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pmner-text textarea"))
        driver.find_element(By.CSS_SELECTOR, "#pmner-text textarea").send_keys(args.screenshot_tweet)
        driver.find_element(By.CSS_SELECTOR, "#pmner-image input[type=file]").send_keys(picture)
        wait.until(lambda d: "photo" in d.find_element(By.CSS_SELECTOR, "#pmner-image").text)
        driver.find_element(By.CSS_SELECTOR, "#pmner-submit").click()
        wait.until(lambda d: "answered in" in d.find_element(By.CSS_SELECTOR, "#pmner-details").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pmner-picture img"))
        time.sleep(1)
        driver.save_screenshot(args.screenshot)
        from PIL import Image

        with Image.open(args.screenshot) as shot:  # 256 colours: a small PNG for the README
            small = shot.convert("RGB").quantize(256)
        small.save(args.screenshot, optimize=True)
        print(f"wrote {args.screenshot}")
    finally:
        stop(driver, app)


def bench_frr(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, PROJECT)
    from processing_pmner import PMNERImageProcessor

    torch.set_num_threads(args.threads)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    for label in ("default settings, random weights",):
        processor = PMNERImageProcessor(detector_weights="random:0", backbone_weights="random:0")
        started = time.perf_counter()
        processor.load_models("cpu")
        built = time.perf_counter() - started
        processor([image])  # warm-up
        times = []
        for _ in range(args.frr_rounds):
            started = time.perf_counter()
            output = processor([image])
            times.append(time.perf_counter() - started)
        objects = int(output["visual_mask"].sum())
        print(f"FRR per image ({label}; {objects} objects): median {statistics.median(times):.2f} s over "
              f"{len(times)} (models built in {built:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(PROJECT, "outputs", "speed-model"))
    parser.add_argument("--tweets", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frr-rounds", type=int, default=3)
    parser.add_argument("--frr-only", action="store_true")
    parser.add_argument("--page-only", action="store_true")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    parser.add_argument("--screenshot", default=None, help="Write the README's screenshot here (PNG) and stop.")
    parser.add_argument("--screenshot-tweet", default="Kawhi Leonard wins the NBA fan vote ahead of LeBron James in Toronto")
    args = parser.parse_args()
    if args.screenshot:
        screenshot(args)
        return
    if not args.frr_only:
        bench_page(args)
    if not args.page_only:
        bench_frr(args)


if __name__ == "__main__":
    main()
