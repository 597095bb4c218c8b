"""Label words are tokenised as they appear in running text after a space, for every tokenizer family: WordPiece
(BERT), byte-level BPE (RoBERTa) and SentencePiece/Unigram (XLM-R). The tokenizers are built here with the
`tokenizers` library from fixture-style text (BPE and WordPiece trained); nothing is downloaded."""

import math
import random
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM

from modeling_pmner import PMNERForTokenClassification, default_verbalizer, tag_names
from modeling_pmner.modeling_pmner import resolve_label_word_ids

from fixtures import make_tweet


VERBALIZER = default_verbalizer(tag_names("BIOES"))
LABEL_WORDS = sorted({word for words in VERBALIZER.values() for word in words})


def corpus() -> list[str]:
    """Tweets of the fixture plus sentences using every label word in running text."""
    rng = random.Random(0)
    lines = [" ".join(make_tweet(rng)[0]) for _ in range(200)]
    lines += [f"the {word} of the {other} is {word}" for word in LABEL_WORDS for other in LABEL_WORDS]
    return lines


def byte_level_bpe(add_prefix_space: bool) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )


def wordpiece() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def unigram() -> PreTrainedTokenizerFast:
    """An XLM-R-style SentencePiece Unigram tokenizer (Metaspace "▁", prepended). Its pieces are the corpus' words
    ("▁word") and characters, scored by log frequency: the `tokenizers` UnigramTrainer prunes a corpus this small
    down to single characters, which would not tell the marker of running text apart."""
    words, chars = Counter(), Counter()
    for line in corpus():
        for word in line.split():
            words["▁" + word] += 1
            chars.update(word)
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    counts = {piece: count for piece, count in words.items() if count >= 5} | dict(chars) | {"▁": sum(chars.values())}
    total = sum(counts.values())
    vocab = [(token, 0.0) for token in special] + [(piece, math.log(count / total)) for piece, count in counts.items()]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=special.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>",
    )


def unigram_prepending_normalizer() -> PreTrainedTokenizerFast:
    """The same Unigram model with the normalizer of transformers' non-legacy SentencePiece conversions (Llama, T5
    style): "▁" prepended and spaces replaced by the normalizer. There " person" gives ["▁", "▁person"], so a label
    word cannot be tokenised by prefixing a space: it must follow another word."""
    tokenizer = unigram()
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    assert tokenizer.tokenize(" person") == ["▁", "▁person"]
    return tokenizer


# (tokenizer factory, the marker a word's first piece carries in running text)
FAMILIES = {
    "wordpiece": (wordpiece, ""),
    "byte-level-bpe": (lambda: byte_level_bpe(add_prefix_space=False), "Ġ"),
    "byte-level-bpe-prefix-space": (lambda: byte_level_bpe(add_prefix_space=True), "Ġ"),
    "unigram": (unigram, "▁"),
    "unigram-prepending-normalizer": (unigram_prepending_normalizer, "▁"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_label_words_are_tokenised_as_in_running_text(family):
    factory, marker = FAMILIES[family]
    tokenizer = factory()
    resolved = resolve_label_word_ids(VERBALIZER, tokenizer)
    assert resolved.keys() == VERBALIZER.keys()
    # the corpus makes "person" one piece in running text: exactly the piece a sentence gives
    assert tokenizer.convert_ids_to_tokens(resolved["B-PER"][1]) == [marker + "person"]
    for tag, words in VERBALIZER.items():
        for word, ids in zip(words, resolved[tag]):
            pieces = tokenizer.convert_ids_to_tokens(ids)
            # the pieces the word has inside a tweet, after other words
            in_sentence = tokenizer.tokenize(f"rt @user : {word} visits london")
            start = next(i for i in range(len(in_sentence)) if in_sentence[i : i + len(pieces)] == pieces)
            assert start > 0
            assert pieces[0].startswith(marker)
            if marker:
                assert not any(piece.startswith(marker) for piece in pieces[1:])
            else:
                assert all(piece.startswith("##") for piece in pieces[1:])
            assert tokenizer.decode(ids).strip() == word


def test_text_start_pieces_differ_from_running_text_for_byte_level_bpe():
    """Why the anchor matters: at the start of a text without a prefix space, RoBERTa-style BPE gives other ids."""
    tokenizer = byte_level_bpe(add_prefix_space=False)
    at_start = tokenizer("person", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(at_start) != ["Ġperson"]
    assert resolve_label_word_ids({"O": ["person"]}, tokenizer)["O"] == [tokenizer.convert_tokens_to_ids(["Ġperson"])]


def test_from_text_pretrained_on_a_roberta_masked_lm(tmp_path):
    tokenizer = byte_level_bpe(add_prefix_space=False)
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    masked_lm = RobertaForMaskedLM(config)
    masked_lm.save_pretrained(tmp_path)
    model = PMNERForTokenClassification.from_text_pretrained(str(tmp_path), fusion_num_heads=4, visual_feature_dim=8)
    person = model.config.label_word_ids["B-PER"][1]
    assert tokenizer.convert_ids_to_tokens(person) == ["Ġperson"]
    torch.testing.assert_close(model.verbalizer_head.dense.weight, masked_lm.lm_head.dense.weight)
    encoded = tokenizer(["Ġrt"], return_tensors="pt")
    logits = model(input_ids=encoded["input_ids"], visual_features=torch.randn(1, 2, 8)).logits
    assert logits.shape == (1, encoded["input_ids"].shape[1], 9) and torch.isfinite(logits).all()
