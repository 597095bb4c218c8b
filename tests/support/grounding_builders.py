"""Builders of grounding test inputs: an image processor whose small random detector finds objects on any image, an
image of four colour blocks, a tiny visual P-MNER folder with that detector, and a tweet for it."""

from PIL import Image

from fixtures import write_tiny_masked_lm
from pipeline_builders import build_model, force_tag, save_folder
from processing_pmner import PMNERImageProcessor, PMNERProcessor


def detecting_image_processor(max_objects: int = 3) -> PMNERImageProcessor:
    """A small detector with seeded random weights that keeps every detection (score threshold 0): objects with
    boxes, COCO labels and scores on any image, deterministically."""
    return PMNERImageProcessor(
        detector="fasterrcnn_mobilenet_v3_large_320_fpn", detector_weights="random:0",
        detector_kwargs={"box_score_thresh": 0.0}, score_threshold=0.0, backbone="resnet18",
        backbone_weights="random:0", crop_size=32, max_objects=max_objects,
    )


def blocks_image(width: int = 64, height: int = 48) -> Image.Image:
    """Four flat colour blocks: resizing it keeps its content (up to the block edges)."""
    image = Image.new("RGB", (4, 3), (250, 250, 250))
    for x, y, colour in ((0, 0, (200, 30, 30)), (3, 0, (30, 160, 40)), (1, 2, (30, 40, 200)), (2, 1, (230, 200, 20))):
        image.putpixel((x, y), colour)
    return image.resize((width, height), Image.NEAREST)


def write_tiny_grounding_folder(root, tag: str = "B-PER") -> str:
    """A tiny visual P-MNER folder (every word tagged `tag`) whose image processor has the small random detector
    at score threshold 0: every image gets 3 detected objects."""
    from transformers import AutoTokenizer

    text_model = write_tiny_masked_lm(root / "tiny-bert")
    model = force_tag(build_model(text_model, use_visual=True), tag)
    labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
    processor = PMNERProcessor(
        detecting_image_processor(), AutoTokenizer.from_pretrained(text_model), label_names=labels, max_length=32
    )
    return save_folder(root / "tiny-grounding-pmner", model, processor)


TEXT = "Kawhi Leonard wins the fan vote"  # a tweet for the grounding folder: every word an entity
