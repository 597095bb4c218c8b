"""Small offline fixtures shared by the tests: a tiny BERT masked LM with its tokenizer, and a tiny Twitter MNER
data set (CoNLL text plus generated images)."""

import os
import random

from PIL import Image
from transformers import BertConfig, BertForMaskedLM, BertTokenizer


PEOPLE = ["trump", "obama", "kawhi", "leonard"]
PLACES = ["london", "paris", "york"]
ORGS = ["nba", "apple", "google"]
FILLER = ["rt", "@user", ":", "new", "festival", "vote", "year", "the", "!", "#", "today", "visits", "meets", "in", "at"]
WORDS = sorted(
    set(PEOPLE + PLACES + ORGS + FILLER)
    | set("the word of is none begin inside end single person location organization miscellaneous other".split())
    | set(", . ? a b c d e f g h i j k l m n o p q r s t u v w x y z".split())
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"##{letter}" for letter in "abcdefghijklmnopqrstuvwxyz"]

TINY_BERT = dict(
    vocab_size=len(VOCAB),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=128,
)


def write_tiny_tokenizer(folder) -> BertTokenizer:
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_tiny_masked_lm(folder, seed: int = 0) -> str:
    """A BERT masked LM of hidden size 32 and its tokenizer, saved like a Hub checkpoint."""
    import torch

    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig(**TINY_BERT)).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return str(folder)


def make_tweet(rng: random.Random) -> tuple[list[str], list[str]]:
    """A tweet with a learnable pattern: '<PER> visits <LOC>' or 'rt @user : <ORG> meets <PER> today'."""
    if rng.random() < 0.5:
        tokens = [rng.choice(PEOPLE), "visits", rng.choice(PLACES), rng.choice(["today", "!", "#"])]
        tags = ["B-PER", "O", "B-LOC", "O"]
    else:
        tokens = ["rt", "@user", ":", rng.choice(ORGS), "meets", rng.choice(PEOPLE), rng.choice(PEOPLE)]
        tags = ["O", "O", "O", "B-ORG", "O", "B-PER", "I-PER"]
    if rng.random() < 0.3:
        tokens += ["festival", "of", "the", "year"]
        tags += ["B-MISC", "I-MISC", "I-MISC", "I-MISC"]
    return tokens, tags


def write_twitter_fixture(data_dir, image_dir=None, sizes=(40, 12, 12), seed: int = 0, missing_images=()) -> None:
    """train/valid/test.txt in the benchmark's CoNLL format and one generated JPEG per tweet (except
    `missing_images`)."""
    rng = random.Random(seed)
    os.makedirs(data_dir, exist_ok=True)
    if image_dir is not None:
        os.makedirs(image_dir, exist_ok=True)
    for split, size in zip(("train", "valid", "test"), sizes):
        lines = []
        for index in range(size):
            image_id = f"{split}_{index}"
            tokens, tags = make_tweet(rng)
            lines.append(f"IMGID:{image_id}")
            lines += [f"{token}\t{tag}" for token, tag in zip(tokens, tags)]
            lines.append("")
            if image_dir is not None and image_id not in missing_images:
                color = tuple(rng.randrange(256) for _ in range(3))
                image = Image.new("RGB", (rng.randrange(48, 96), rng.randrange(48, 96)), color)
                image.save(os.path.join(image_dir, f"{image_id}.jpg"))
        with open(os.path.join(data_dir, f"{split}.txt"), "w") as handle:
            handle.write("\n".join(lines) + "\n")
