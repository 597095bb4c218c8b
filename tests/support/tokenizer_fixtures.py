"""Tiny masked LMs of several families, each with a tokenizer whose vocabulary is trained here (with the `tokenizers`
library) on the fixture tweets: WordPiece (BERT, DistilBERT, ELECTRA; MPNet with RoBERTa-style specials), byte-level BPE (RoBERTa) and a SentencePiece
style Unigram (XLM-R). Saved like Hub checkpoints, offline, in about a second each."""

import functools
import json
import os
import random

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertTokenizer,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraTokenizer,
    MPNetConfig,
    MPNetForMaskedLM,
    MPNetTokenizer,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizer,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
    XLMRobertaTokenizer,
)

from fixtures import PROJECT, make_tweet


FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet")
VOCAB_SIZE = 600
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's and XLM-R's ids 0-3 (+ mask)
# all-mpnet-base-v2's: a WordPiece vocabulary (unknown word [UNK]) with <s> <pad> </s> <unk> at ids 0-3 and <mask>
MPNET_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>"]
# mixed-case running text beside the fixture's lower-case tweets, so that words are split into several sub-words
EXTRA_TEXT = [
    "RT @Bundesliga_EN : Kawhi Leonard wins the NBA fan vote ! #NBAAwards",
    "New Post : Blackburn Festival of Voice 2017 in London with Trump and Obama",
    "Apple meets Google in Paris today , the word of the year is none",
    "begin inside end single person location organization miscellaneous other none .",
]
TWITTER2017_TRAIN = os.path.join(PROJECT, "..", "shared", "data", "twitter2017", "train.txt")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def corpus(num_tweets: int = 300, seed: int = 0) -> list[str]:
    """The fixture's generated tweets (as running text), a few mixed-case ones and, where the benchmark's text is
    beside the repository, the Twitter-2017 training tweets (enough text for a vocabulary of `VOCAB_SIZE`)."""
    rng = random.Random(seed)
    text = [" ".join(make_tweet(rng)[0]) for _ in range(num_tweets)] + EXTRA_TEXT * 5
    if os.path.isfile(TWITTER2017_TRAIN):
        words = []
        with open(TWITTER2017_TRAIN, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("IMGID:") or not line.strip():
                    if words:
                        text.append(" ".join(words))
                    words = []
                else:
                    words.append(line.split("\t")[0])
    return text


def train_wordpiece(lowercase: bool = True, specials: tuple[str, ...] = tuple(WORDPIECE_SPECIALS)) -> dict[str, int]:
    return dict(_trained_wordpiece(lowercase, specials))


@functools.lru_cache(maxsize=4)
def _trained_wordpiece(lowercase: bool, specials: tuple[str, ...]) -> dict[str, int]:
    # BERT, DistilBERT and ELECTRA share one training; MPNet's has its own special tokens
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(specials))
    backend.train_from_iterator(corpus(), trainer)
    return backend.get_vocab()


def train_byte_level_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=ROBERTA_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus(), trainer)
    state = json.loads(backend.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in state["merges"]]
    return state["vocab"], merges


def train_unigram() -> list[tuple[str, float]]:
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=VOCAB_SIZE, special_tokens=ROBERTA_SPECIALS, unk_token="<unk>")
    backend.train_from_iterator(corpus()[:1200], trainer)  # the slowest trainer: 1,200 tweets are enough
    return [(piece, score) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]


def build_tokenizer(family: str):
    """The family's tokenizer class over a vocabulary trained on the fixture text (no `add_prefix_space` given:
    as `AutoTokenizer.from_pretrained` gives a RoBERTa checkpoint's)."""
    if family in ("bert", "distilbert", "electra"):
        tokenizer_class = {"bert": BertTokenizer, "distilbert": DistilBertTokenizer, "electra": ElectraTokenizer}
        return tokenizer_class[family](vocab=train_wordpiece(), do_lower_case=True)
    # the mask takes the space before it, as in roberta-base, xlm-roberta-base and all-mpnet-base-v2
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
    if family == "mpnet":
        return MPNetTokenizer(vocab=train_wordpiece(specials=tuple(MPNET_SPECIALS)), do_lower_case=True, mask_token=mask)
    if family == "roberta":
        vocab, merges = train_byte_level_bpe()
        return RobertaTokenizer(vocab=vocab, merges=merges, mask_token=mask)
    if family == "xlm-roberta":
        return XLMRobertaTokenizer(vocab=train_unigram(), mask_token=mask)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def build_masked_lm(family: str, tokenizer, max_positions: int = 130):
    vocab_size = len(tokenizer)
    if family == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, **TINY))
    if family == "electra":
        config = ElectraConfig(vocab_size=vocab_size, embedding_size=32, max_position_embeddings=max_positions, **TINY)
        return ElectraForMaskedLM(config)
    if family == "distilbert":
        config = DistilBertConfig(
            vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=max_positions
        )
        return DistilBertForMaskedLM(config)
    if family == "mpnet":  # positions start after the padding id, as in RoBERTa
        config = MPNetConfig(
            vocab_size=vocab_size, max_position_embeddings=max_positions + 2, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY,
        )
        return MPNetForMaskedLM(config)
    config_class, model_class = {
        "roberta": (RobertaConfig, RobertaForMaskedLM),
        "xlm-roberta": (XLMRobertaConfig, XLMRobertaForMaskedLM),
    }[family]
    config = config_class(
        vocab_size=vocab_size, max_position_embeddings=max_positions + 2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, type_vocab_size=1, **TINY,
    )
    return model_class(config)


def write_tiny_family(family: str, folder, seed: int = 0) -> str:
    """A tiny masked LM of `family` and its trained tokenizer, saved in `folder` like a Hub checkpoint."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(family)
    build_masked_lm(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
