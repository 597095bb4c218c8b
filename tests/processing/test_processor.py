"""The prompt-template processor: tag schemes, word windows, token and cloze rows, truncation and padding, the
mapping that decodes predictions back to words, the remote-code round trip, and the checks that processor and model
agree (tags, scheme) and that visual features and tokenizers are usable. Offline, tiny models."""

import json
import os
import random
import shutil
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from processing_pmner import (
    PMNERImageProcessor,
    PMNERProcessor,
    TruncationWarning,
    bio_to_bioes,
    bioes_to_bio,
    window_owner,
    word_windows,
)

from fixtures import run_without_project
from processing_builders import (
    BIO,
    BIOES,
    SENTENCES,
    TAGS,
    colour_processor,
    make_processor,
    one_hot_logits,
    tiny_model,
    tiny_tokenizer,
)


# ----------------------------------------------------------------------------------------------------------------------
# tag schemes and windows
# ----------------------------------------------------------------------------------------------------------------------


def test_bio_bioes_conversion_exact_both_ways():
    bio = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-LOC", "O", "B-ORG"]
    bioes = ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "I-LOC", "E-LOC", "O", "S-ORG"]
    assert bio_to_bioes(bio) == bioes
    assert bioes_to_bio(bioes) == bio
    generator = random.Random(0)
    for _ in range(300):
        tags, previous = [], "O"
        for _ in range(generator.randint(0, 12)):
            choice = generator.choice(["O", "B-PER", "B-LOC", "I"])
            tag = (f"I-{previous[2:]}" if previous != "O" else "O") if choice == "I" else choice
            tags.append(tag)
            previous = tag
        assert bioes_to_bio(bio_to_bioes(tags)) == tags
        converted = bio_to_bioes(tags)
        assert bio_to_bioes(bioes_to_bio(converted)) == converted
    # an I- that starts an entity is read as a beginning (conlleval)
    assert bio_to_bioes(["O", "I-PER", "I-PER", "I-LOC"]) == ["O", "B-PER", "E-PER", "S-LOC"]
    with pytest.raises(ValueError, match="X-PER"):
        bio_to_bioes(["X-PER"])


def test_word_windows_cover_every_word_once_with_overlap():
    counts = [1, 2, 1, 3, 1, 1, 2, 1, 1, 1, 2, 1]
    windows = word_windows(counts, budget=5, stride=2)
    assert windows[0][0] == 0 and windows[-1][1] == len(counts)
    for start, end in windows:
        assert sum(counts[start:end]) <= 5 and end > start
    for (_, end), (start, _) in zip(windows, windows[1:]):
        assert start < end  # overlap
    owners = [window_owner(windows, word, len(counts)) for word in range(len(counts))]
    for word, owner in enumerate(owners):
        assert windows[owner][0] <= word < windows[owner][1]
    assert owners == sorted(owners)


# ----------------------------------------------------------------------------------------------------------------------
# the processor
# ----------------------------------------------------------------------------------------------------------------------


def test_token_mode_aligns_labels_to_first_sub_words_and_runs_the_model(tokenizer, image_files):
    processor = make_processor(tokenizer, label_names=BIOES)
    batch = processor(SENTENCES, images=[image_files["jpeg"], None, image_files["png"]], labels=TAGS)
    assert set(batch.keys()) == {"input_ids", "attention_mask", "token_type_ids", "visual_features", "visual_mask", "labels"}
    length = batch["input_ids"].shape[1]
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens[:15] == ["[CLS]", "trump", "vote", "new", "york", "##s", ",", "the", "word", "of", "[MASK]", "is",
                      "[MASK]", ".", "[SEP]"]
    ids = {name: index for index, name in enumerate(BIOES)}
    assert batch["labels"][0].tolist() == [-100, ids["S-PER"], 0, ids["B-LOC"], ids["E-LOC"]] + [-100] * (length - 5)
    assert batch.word_ids(0)[:7] == [None, 0, 1, 2, 3, 3, None]
    assert batch["visual_mask"][:, 0].tolist() == [True, False, True]  # whole-image object; no image: text only
    assert batch["attention_mask"][2].sum() == 11 and batch["labels"][2, 11:].eq(-100).all()
    model = tiny_model(BIOES)
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.shape == (3, length, len(BIOES)) and torch.isfinite(output.loss)
    tags = processor.post_process_token_classification(output, batch)
    assert [len(sentence) for sentence in tags] == [4, 5, 1]
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIOES)), batch) == TAGS
    assert processor.post_process_token_classification(batch["labels"].clamp(min=0), batch, output_scheme="BIOES")[0] == [
        "S-PER", "O", "B-LOC", "E-LOC"]

    # ids pass through; precomputed features pass through; nothing gives zeros with a false mask
    id_batch = processor(SENTENCES[0], labels=[ids[t] for t in ["S-PER", "O", "B-LOC", "E-LOC"]])
    assert id_batch["labels"].tolist() == batch["labels"][:1, :15].tolist()
    assert id_batch["visual_features"].shape == (1, 5, 3) and not id_batch["visual_mask"].any()
    features = torch.randn(3, 2, 3)
    passed = processor(SENTENCES, visual_features=features, visual_mask=torch.tensor([[1, 0], [1, 1], [0, 0]]))
    torch.testing.assert_close(passed["visual_features"], features)
    assert passed["visual_mask"].tolist() == [[True, False], [True, True], [False, False]]
    with pytest.raises(ValueError, match="B-FOOD"):
        processor(SENTENCES[0], labels=["B-FOOD", "O", "O", "O"])
    with pytest.raises(ValueError, match="4 words but 3 labels"):
        processor(SENTENCES[0], labels=["O", "O", "O"])
    with pytest.raises(ValueError, match="either `images` or precomputed"):
        processor(SENTENCES[0], images=image_files["png"], visual_features=torch.zeros(1, 5, 3))


def test_cloze_mode_one_query_per_word_predicted_at_the_mask(tokenizer):
    processor = make_processor(tokenizer, prompt_mode="cloze", label_names=BIO)
    batch = processor(SENTENCES, labels=TAGS)
    assert batch["input_ids"].shape[0] == 4 + 5 + 1
    assert batch.sample_mapping == [0] * 4 + [1] * 5 + [2]
    assert batch.mapping["query_word"] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][3])
    assert tokens[: tokens.index("[SEP]") + 1] == ["[CLS]", "trump", "vote", "new", "york", "##s", ",", "the", "word",
                                                    "of", "york", "##s", "is", "[MASK]", ".", "[SEP]"]
    labelled = batch["labels"] != -100  # (rows, L)
    assert labelled.sum(1).tolist() == [1] * 10
    mask_id = tokenizer.mask_token_id
    assert (batch["input_ids"][labelled] == mask_id).all()
    assert batch["labels"][3, 13].item() == BIO.index("I-LOC")
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIO)), batch) == TAGS
    model = tiny_model(BIO)
    with torch.no_grad():
        output = model(**batch)
    assert len(processor.post_process_token_classification(output.logits, batch)[1]) == 5
    with pytest.raises(ValueError, match="cloze"):
        make_processor(tokenizer, prompt_mode="cloze", prompt_template="{sentence} is {mask}")


@pytest.mark.parametrize("mode", ["token", "cloze"])
def test_long_sentences_become_windows_and_merge_back(tokenizer, mode):
    generator = random.Random(3)
    vocabulary = ["new", "york", "trump", "apple", "google", "vote", "year", "festival", "yorks", "nba"]
    words = [generator.choice(vocabulary) for _ in range(37)]
    bio = bioes_to_bio(bio_to_bioes([generator.choice(["O", "B-PER", "I-PER", "B-LOC"]) for _ in words]))
    processor = make_processor(tokenizer, prompt_mode=mode, label_names=BIOES, max_length=24, stride=3)
    batch = processor([words, ["paris"]], labels=[bio, ["B-LOC"]], return_mapping=True)
    assert batch["input_ids"].shape[1] <= 24
    assert batch.num_dropped_words == [0, 0]
    windows = [window for window, sample in zip(batch.mapping["windows"], batch.sample_mapping) if sample == 0]
    assert len(set(windows)) > 1
    # every word is predicted in exactly one row, with its label
    predicted = batch["prediction_word_index"][batch["sample_mapping"] == 0]  # (rows0, L)
    assert sorted(predicted[predicted >= 0].tolist()) == list(range(len(words)))
    assert (batch["labels"] != -100).sum().item() == len(words) + 1
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIOES)), batch) == [bio, ["B-LOC"]]
    # the keys kept by return_mapping are enough to decode (e.g. after datasets.map)
    as_dict = {key: batch[key] for key in ("sample_mapping", "prediction_word_index", "num_words")}
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIOES)), as_dict) == [bio, ["B-LOC"]]


def test_truncation_reports_dropped_words(tokenizer):
    processor = make_processor(tokenizer, label_names=BIO, max_length=20, overflow="truncate")
    words = ["new"] * 30
    with pytest.warns(TruncationWarning, match=r"sentence 0 .* last 20 of 30 words are dropped"):
        batch = processor([words], labels=[["B-LOC"] + ["I-LOC"] * 29])
    assert batch.num_dropped_words == [20]  # 2 special + 8 template tokens leave 10
    assert batch["input_ids"].shape == (1, 20)
    tags = processor.post_process_token_classification(one_hot_logits(batch, len(BIO)), batch)
    assert tags[0] == ["B-LOC"] + ["I-LOC"] * 9 + ["O"] * 20
    with pytest.raises(ValueError, match="max_length=8 leaves no room"):
        make_processor(tokenizer, max_length=8)


def test_left_padding_keeps_the_mapping_aligned(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    processor = make_processor(tokenizer, label_names=BIO)
    batch = processor(SENTENCES, labels=TAGS)
    assert batch["attention_mask"][2, 0] == 0
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIO)), batch) == TAGS


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained({folder!r}, trust_remote_code=True)
    assert "transformers_modules" in type(processor).__module__, type(processor).__module__
    assert not processor.image_processor.models_built
    batch = processor({sentences!r}, images={images!r}, labels={tags!r})
    result = {{key: value.tolist() for key, value in batch.items()}}
    result["decoded"] = processor.post_process_token_classification(batch["labels"].clamp(min=0), batch)
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("mode", ["token", "cloze"])
def test_save_and_load_with_remote_code_in_a_fresh_process(image_files, tmp_path, mode):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    image_processor = PMNERImageProcessor(
        detector=None, backbone="resnet18", backbone_weights=str(tmp_path / "resnet18.pth"), crop_size=32, max_objects=3
    )
    processor = PMNERProcessor(image_processor, tiny_tokenizer(), prompt_mode=mode, label_names=BIOES, max_length=40)
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    files = set(os.listdir(saved))
    siblings = {"text_tag_schemes.py", "text_word_start_spaces.py", "text_windows.py"}  # imported by processing_pmner.py
    assert {"processor_config.json", "processing_pmner.py", "image_processing_pmner.py"} | siblings <= files
    config = json.loads((saved / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_pmner.PMNERProcessor"
    assert config["prompt_mode"] == mode and config["label_names"] == BIOES and config["image_processor"]["max_objects"] == 3

    local = AutoProcessor.from_pretrained(saved)  # registered classes, this process
    assert type(local) is PMNERProcessor and local.label_names == BIOES

    elsewhere = tmp_path / "elsewhere" / "pmner-processor"
    shutil.copytree(saved, elsewhere)
    images = [str(image_files["jpeg"]), str(image_files["exif"]), None]
    expected = processor(SENTENCES, images=images, labels=TAGS)
    os.remove(tmp_path / "resnet18.pth")  # the source file is gone (it was in the remote process's working folder)
    script = REMOTE_SCRIPT.format(folder=str(elsewhere), sentences=SENTENCES, images=images, tags=TAGS)
    result = run_without_project(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels", "visual_mask"):
        assert remote[key] == expected[key].tolist(), key
    np.testing.assert_allclose(np.asarray(remote["visual_features"]), expected["visual_features"].numpy(), atol=1e-5)
    assert remote["decoded"] == TAGS


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", ["token", "cloze"])
def test_no_padding_gives_each_row_its_own_length(side, mode):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = side
    processor = make_processor(tokenizer, label_names=BIOES, prompt_mode=mode, max_length=20, stride=1)
    sentences = SENTENCES + [["new"] * 15]
    tags = TAGS + [["O"] * 14 + ["B-LOC"]]
    padded = processor(sentences, labels=tags, return_tensors=None, return_mapping=True)
    unpadded = processor(sentences, labels=tags, return_tensors=None, padding=False, return_mapping=True)
    lengths = [sum(mask) for mask in padded["attention_mask"]]
    assert len(set(lengths)) > 1 and [len(row) for row in unpadded["input_ids"]] == lengths
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels", "word_ids", "prediction_word_index"):
        expected = [
            row[len(row) - length :] if side == "left" else row[:length] for row, length in zip(padded[key], lengths)
        ]
        assert unpadded[key] == expected, key
    for key in ("sample_mapping", "num_words", "visual_features", "visual_mask"):
        assert unpadded[key] == padded[key], key
    with pytest.raises(ValueError, match=r"padding=False \('do_not_pad'\) leaves rows of different lengths.*return_tensors=None"):
        processor(sentences, padding=False)
    with pytest.raises(ValueError, match="padding must be"):
        processor(sentences, padding="shortest")


@pytest.mark.parametrize("padding", ["longest", False])
def test_a_cloze_batch_of_empty_tweets_keeps_every_column(padding):
    processor = make_processor(tiny_tokenizer(), label_names=BIO, prompt_mode="cloze")
    tensors = "pt" if padding == "longest" else None
    batch = processor([[], []], labels=[[], []], padding=padding, return_tensors=tensors, return_mapping=True)
    expected = {"input_ids", "attention_mask", "token_type_ids", "labels", "visual_features", "visual_mask",
                "sample_mapping", "word_ids", "prediction_word_index", "num_words"}
    assert set(batch) == expected  # datasets.map needs the same columns from every batch
    assert all(len(batch[key]) == 0 for key in expected)
    if tensors == "pt":
        assert batch["input_ids"].shape == (0, 0)
        assert processor.post_process_token_classification(torch.zeros(0, 0, len(BIO)), batch) == [[], []]


def test_mapping_survives_datasets_map_and_decodes_from_columns(tokenizer):
    import datasets

    processor = make_processor(tokenizer, label_names=BIOES, max_length=20, stride=1)
    raw = datasets.Dataset.from_dict({"tokens": SENTENCES + [["new"] * 15], "tags": TAGS + [["O"] * 14 + ["B-LOC"]]})

    def encode(batch, indices):
        encoding = dict(processor(batch["tokens"], labels=batch["tags"], return_tensors=None, return_mapping=True))
        encoding["sample_mapping"] = [indices[sample] for sample in encoding["sample_mapping"]]
        return encoding

    encoded = raw.map(encode, batched=True, batch_size=2, with_indices=True, remove_columns=raw.column_names)
    assert len(encoded) > len(raw)  # the long sentence became windows
    width = max(len(row) for row in encoded["input_ids"])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in encoded["labels"]])  # (rows, width)
    mapping = {
        "sample_mapping": encoded["sample_mapping"],
        "prediction_word_index": [row + [-1] * (width - len(row)) for row in encoded["prediction_word_index"]],
        "num_words": encoded["num_words"],
    }
    assert processor.post_process_token_classification(labels.clamp(min=0), mapping) == raw["tags"][:]


# ----------------------------------------------------------------------------------------------------------------------
# Processor and model: the same tags; visual features checked; words encoded as in running text
# ----------------------------------------------------------------------------------------------------------------------


def test_processor_and_model_with_other_labels_or_scheme_raise_naming_both(tokenizer):
    from types import SimpleNamespace

    from processing_pmner.processing_pmner import check_processor_matches_model

    processor = make_processor(tokenizer, label_names=BIO)
    check_processor_matches_model(processor, tiny_model(BIO).config)  # the same: no error
    with pytest.raises(ValueError) as caught:
        check_processor_matches_model(processor, tiny_model(BIOES).config)
    message = str(caught.value)
    assert str(BIO) in message and str(BIOES) in message and "9 tags" in message and "17 tags" in message
    assert "tag scheme BIO differs from the model's BIOES" in message
    reordered = ["O"] + BIO[3:] + BIO[1:3]  # same tags, other ids
    with pytest.raises(ValueError, match="differ from the model's config.id2label"):
        check_processor_matches_model(make_processor(tokenizer, label_names=reordered), tiny_model(BIO).config)
    # a config whose scheme says BIOES over BIO tags (edited by hand): the scheme alone is named
    edited = SimpleNamespace(num_labels=len(BIO), id2label=dict(enumerate(BIO)), tag_scheme="BIOES")
    with pytest.raises(ValueError, match="tag scheme BIO differs from the model's BIOES") as caught:
        check_processor_matches_model(processor, edited)
    assert "differ from the model's config.id2label" not in str(caught.value)


REFUSED_SCRIPT = textwrap.dedent(
    """
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained({matching!r}, trust_remote_code=True)
    assert "transformers_modules" in type(processor).__module__, type(processor).__module__
    print("MATCHING", processor.label_names)
    try:
        AutoProcessor.from_pretrained({edited!r}, trust_remote_code=True)
    except ValueError as error:
        print("REFUSED", error)
    """
)


def saved_model_and_edited_processor(tokenizer, tmp_path):
    """A folder with a 9-tag model and its processor, and a copy whose processor_config.json has 5 of the tags."""
    saved = tmp_path / "saved"
    tiny_model(BIO).save_pretrained(saved)
    PMNERProcessor(colour_processor(save_frr_weights=False), tokenizer, label_names=BIO).save_pretrained(saved)
    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    settings = json.loads((edited / "processor_config.json").read_text())
    settings["label_names"] = BIO[:5]
    (edited / "processor_config.json").write_text(json.dumps(settings))
    return saved, edited


def test_a_saved_processor_with_other_labels_than_the_model_beside_it_is_refused_at_load(tokenizer, tmp_path):
    saved, edited = saved_model_and_edited_processor(tokenizer, tmp_path)
    assert AutoProcessor.from_pretrained(saved).label_names == BIO  # the same tags: loads
    for load in (AutoProcessor.from_pretrained, PMNERProcessor.from_pretrained):
        with pytest.raises(ValueError) as caught:
            load(edited)
        message = str(caught.value)
        assert f"label_names (5 tags) {BIO[:5]}" in message and f"config.id2label (9 tags) {BIO}" in message
        assert str(edited) in message
    # remote code in a process without this project (a Hub user's): refused the same way
    result = run_without_project(REFUSED_SCRIPT.format(matching=str(saved), edited=str(edited)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MATCHING {BIO}" in result.stdout
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused and f"label_names (5 tags) {BIO[:5]}" in refused[0] and f"(9 tags) {BIO}" in refused[0]
    # beside another model type (or no model at all) there is nothing to compare with: it loads
    (edited / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert PMNERProcessor.from_pretrained(edited).label_names == BIO[:5]
    (edited / "config.json").unlink()
    assert PMNERProcessor.from_pretrained(edited).label_names == BIO[:5]


def test_a_hub_repo_whose_processor_has_other_labels_than_its_model_is_refused_at_load(tokenizer, tmp_path, hub_server):
    saved, edited = saved_model_and_edited_processor(tokenizer, tmp_path)
    api = hub_server.api()
    for folder in (saved, edited):
        api.create_repo(f"user/{folder.name}")
        api.upload_folder(folder_path=str(folder), repo_id=f"user/{folder.name}")
    script = REFUSED_SCRIPT.format(matching="user/saved", edited="user/edited")
    result = run_without_project(script, tmp_path, env=hub_server.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MATCHING {BIO}" in result.stdout
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused and f"label_names (5 tags) {BIO[:5]}" in refused[0] and f"(9 tags) {BIO}" in refused[0]
    assert "config.json of user/edited" in refused[0]


def test_visual_features_from_numpy_and_lists_and_non_finite_rows_refused(tokenizer):
    processor = make_processor(tokenizer)
    features = np.random.default_rng(0).normal(size=(3, 2, 4))  # float64 (batch, objects, D)
    expected = torch.from_numpy(features).float()
    sentences = [["trump"], ["paris", "vote"], ["obama"]]
    for given in (features, list(features), [row.tolist() for row in features], expected.double()):
        batch = processor(sentences, visual_features=given, visual_mask=np.ones((3, 2), dtype=bool))
        assert batch["visual_features"].dtype == torch.float32
        assert torch.allclose(batch["visual_features"], expected)
    single = processor(["trump", "vote"], visual_features=features[0])
    assert torch.allclose(single["visual_features"][0], expected[0])
    for bad in (np.nan, np.inf, -np.inf):
        broken = features.copy()
        broken[1, 1, 2] = bad
        with pytest.raises(ValueError, match=r"visual_features of sentence\(s\) \[1\].*NaN or infinite"):
            processor(sentences, visual_features=broken)
    with pytest.raises(ValueError, match="visual_features must be numbers of one shape"):
        processor(sentences[:2], visual_features=[[[1.0, 2.0]], [[1.0]]])


def test_sentencepiece_without_prefix_space_is_set_right_and_unfixable_tokenizers_warn(caplog, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from processing_pmner.processing_pmner import split_words_match_running_text
    from tokenizer_fixtures import train_unigram

    # Metaspace with prepend_scheme="never": words given one by one lose their "▁" (running text keeps it, from the
    # space before the word); the processor restores it
    backend = Tokenizer(models.Unigram(train_unigram(), unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", mask_token="<mask>", pad_token="<pad>"
    )
    assert not split_words_match_running_text(tokenizer)
    processor = PMNERProcessor(colour_processor(), tokenizer)
    assert split_words_match_running_text(processor.tokenizer)
    assert processor.tokenizer.backend_tokenizer.pre_tokenizer.prepend_scheme == "always"
    assert tokenizer.backend_tokenizer.pre_tokenizer.prepend_scheme == "never"  # the caller's is not changed
    processor.tokenizer.save_pretrained(tmp_path)
    assert split_words_match_running_text(AutoTokenizer.from_pretrained(tmp_path))
    # a tokenizer that joins words in running text (no pre-tokenizer) cannot be set right: said, not hidden
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[MASK]": 1, "[PAD]": 2}, unk_token="[UNK]"))
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", mask_token="[MASK]", pad_token="[PAD]")
    with caplog.at_level("WARNING"):
        processor = PMNERProcessor(colour_processor(), plain)
    assert "encodes words given one by one differently from running text" in caplog.text
    assert processor.tokenizer is plain
