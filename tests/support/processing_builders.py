"""Builders shared by the processing tests: a tiny BERT tokenizer, an image processor whose backbone returns each
crop's mean colour, a detector with fixed boxes, a processor over both, a tiny model, and tag lists and sentences."""

import torch
from PIL import Image
from transformers import BertTokenizer

from modeling_pmner import PMNERConfig, PMNERForTokenClassification
from modeling_pmner.modeling_pmner import resolve_label_word_ids
from processing_pmner import PMNERImageProcessor, PMNERProcessor


WORDS = (
    "the word of is none begin inside end single person location organization miscellaneous other "
    "rt @user # : , . ! ? new york trump apple google obama london paris festival nba vote year "
    "a b c d e f g h i j k l m n o p q r s t u v w x y z"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
VOCAB += [f"##{letter}" for letter in "abcdefghijklmnopqrstuvwxyz"]
BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
BIOES = ["O"] + [f"{p}-{e}" for e in ("PER", "LOC", "ORG", "MISC") for p in "BIES"]
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def tiny_tokenizer(folder=None) -> BertTokenizer:
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


class MeanColour(torch.nn.Module):
    """Backbone stand-in: a crop's mean normalised colour (N, 3, S, S) -> (N, 3); counts the crops it sees."""

    def __init__(self):
        super().__init__()
        self.crops_seen = 0

    def forward(self, crops):
        self.crops_seen += crops.shape[0]
        return crops.mean(dim=(2, 3))  # (N, 3)


def colour_of(feature: torch.Tensor) -> torch.Tensor:
    """Un-normalises a MeanColour feature to 0-255."""
    return (feature * STD + MEAN) * 255


class FixedDetector(torch.nn.Module):
    """Detector stand-in with the torchvision API: the same boxes and scores for every image."""

    def __init__(self, boxes, scores):
        super().__init__()
        self.boxes = torch.tensor(boxes, dtype=torch.float32)  # (K, 4)
        self.scores = torch.tensor(scores, dtype=torch.float32)  # (K,)

    def forward(self, images):
        return [
            {"boxes": self.boxes.clone(), "scores": self.scores.clone(), "labels": torch.ones(len(self.scores), dtype=torch.long)}
            for _ in images
        ]


def colour_processor(**settings) -> PMNERImageProcessor:
    defaults = dict(detector=None, backbone="resnet18", backbone_weights=None, crop_size=16, max_image_side=256)
    processor = PMNERImageProcessor(**{**defaults, **settings})
    processor.set_modules(backbone=MeanColour(), feature_dim=3)
    return processor


def solid(colour, size=(32, 24), mode="RGB"):
    return Image.new(mode, size, colour)


def make_processor(tokenizer, **kwargs) -> PMNERProcessor:
    return PMNERProcessor(colour_processor(), tokenizer, **kwargs)


def tiny_model(label_names, feature_dim=3):
    config = PMNERConfig(
        text_config=dict(model_type="bert", vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=128),
        visual_feature_dim=feature_dim, max_objects=5, fusion_num_heads=4, fusion_intermediate_size=40,
        id2label=dict(enumerate(label_names)), tag_scheme="BIOES" if "S-PER" in label_names else "BIO",
    )
    config.label_word_ids = resolve_label_word_ids(config.verbalizer, tiny_tokenizer())
    torch.manual_seed(0)
    return PMNERForTokenClassification(config).eval()


def one_hot_logits(batch, num_labels):
    labels = batch["labels"]  # (rows, L)
    logits = torch.zeros(*labels.shape, num_labels)  # (rows, L, labels)
    logits.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 1.0)
    return logits


SENTENCES = [["trump", "vote", "new", "yorks"], ["rt", "@user", ":", "obama", "!"], ["paris"]]
TAGS = [["B-PER", "O", "B-LOC", "I-LOC"], ["O", "O", "O", "B-PER", "O"], ["B-LOC"]]
