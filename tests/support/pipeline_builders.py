"""Builders of tiny P-MNER pipelines for the tests: a tiny model, its processor (an FRR backbone from weights no
setting rebuilds), a model forced to one tag, a saved folder with the pipeline's code, an image file, and tweets
that are hard to split."""

import os

import torch
from PIL import Image
from transformers import AutoTokenizer

from fixtures import write_unrebuildable_weights
from modeling_pmner import PMNERForTokenClassification
from processing_pmner import PMNERImageProcessor, PMNERProcessor
from processing_pmner.pipeline_pmner import add_pipeline_to_folder


TRICKY_TWEETS = [
    "RT @Bundesliga_EN: Kawhi's #NBAAwards win!!! https://t.co/AbC123xyz.",
    "New York  New   York\tNew York\n#NewYork",
    "Beyonce\u0301 & Jay-Z 😂❤️👍🏼 🇺🇸 at www.example.com/tour?x=1 :) <3",
    "trump trump trump ... @trump #trump",
    "Zürich • Москва • 東京 — 2.00 pm, May 21, 2016 ($4.99)",
    "   leading and trailing spaces   ",
    "zero\u200bwidth and emoji-only 🔥🔥🔥",
]


def build_model(text_model: str, tag_scheme: str = "BIO", use_visual: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return PMNERForTokenClassification.from_text_pretrained(
        text_model, fusion_num_heads=4, visual_feature_dim=512, max_objects=3, tag_scheme=tag_scheme,
        use_visual=use_visual,
    )


def build_processor(text_model: str, model, max_length: int = 32, stride: int = 4) -> PMNERProcessor:
    # weights no setting rebuilds (a perturbed file beside the text model): a reloaded folder can only read its own
    weights = os.path.join(os.path.dirname(os.path.normpath(text_model)), "frr-resnet18.safetensors")
    if not os.path.isfile(weights):
        write_unrebuildable_weights(weights, seed=0)
    image_processor = PMNERImageProcessor(
        detector=None, backbone="resnet18", backbone_weights=weights, crop_size=32, max_objects=3
    )
    labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
    return PMNERProcessor(
        image_processor, AutoTokenizer.from_pretrained(text_model), label_names=labels, max_length=max_length,
        stride=stride,
    )


def force_tag(model, tag: str, bias: float = 50.0):
    """Makes the model predict `tag` for every word (its head bias dominates the logits)."""
    with torch.no_grad():
        model.verbalizer_head.bias[model.config.label2id[tag]] = bias
    return model


def save_folder(folder, model, processor) -> str:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    add_pipeline_to_folder(folder)
    return str(folder)


def image_file(folder, name="photo.jpg", color=(200, 30, 30)) -> str:
    path = os.path.join(folder, name)
    Image.new("RGB", (64, 48), color).save(path)
    return path
