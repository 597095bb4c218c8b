"""Every masked-LM family: BERT (WordPiece), RoBERTa (byte-level BPE), XLM-R (SentencePiece-style Unigram), DistilBERT,
ELECTRA and MPNet (WordPiece with <s> </s> <mask>), each a tiny model with a vocabulary trained here (support/tokenizer_fixtures.py).

For each: the processor gives the words after the first (and the template) the sub-words the tokenizer gives them in
running text, and one epoch of train_pmner.py (text only) writes a folder that reloads with the same predictions."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoProcessor, AutoTokenizer

from fixtures import PROJECT, write_twitter_fixture
from processing_pmner import PMNERImageProcessor, PMNERProcessor
from processing_pmner.processing_pmner import (
    DEFAULT_PROMPT_TEMPLATE,
    check_processor_matches_model,
    split_words_match_running_text,
)
from tokenizer_fixtures import FAMILIES, write_tiny_family


SENTENCES = [
    ["RT", "@Bundesliga_EN", ":", "Kawhi", "Leonard", "wins", "the", "NBA", "fan", "vote", "!", "#NBAAwards"],
    ["New", "Post", ":", "Blackburn", "Festival", "of", "Voice", "2017", "in", "Zürich", "😂", "https://t.co/AbC"],
]
BYTE_LEVEL = {"roberta"}
ENV = dict(
    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    TQDM_DISABLE="1",
)

DRIVER = textwrap.dedent(
    """
    import json, sys, time, traceback
    sys.path.insert(0, {project!r})
    import train_pmner

    results = {{}}
    for family, argv in {runs!r}.items():
        start = time.perf_counter()
        sys.argv = ["train_pmner.py", *argv]
        try:
            train_pmner.main()
            results[family] = {{"ok": True}}
        except BaseException:
            results[family] = {{"ok": False, "error": traceback.format_exc()[-4000:]}}
        results[family]["seconds"] = round(time.perf_counter() - start, 2)
    with open({report!r}, "w") as handle:
        json.dump(results, handle)
    """
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {family: write_tiny_family(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def one_epoch_runs(checkpoints, tmp_path_factory):
    """One epoch of train_pmner.py per family, all in one fresh process (one import of the stack)."""
    root = tmp_path_factory.mktemp("runs")
    write_twitter_fixture(root / "data", None, sizes=(16, 8, 8))
    runs = {
        family: [
            "--dataset_name", "twitter2017", "--data_dir", str(root / "data"), "--text_only",
            "--text_model_name_or_path", checkpoint, "--output_dir", str(root / family),
            "--do_train", "--do_eval", "--do_predict",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
            "--fusion_num_heads", "4", "--max_seq_length", "64", "--use_cpu", "--seed", "0",
            "--report_to", "none", "--disable_tqdm", "true",
        ]
        for family, checkpoint in checkpoints.items()
    }
    report = root / "report.json"
    script = DRIVER.format(project=PROJECT, runs=runs, report=str(report))
    env = dict(os.environ, HF_HOME=str(root / "hf-home"), **ENV)
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0 and report.is_file(), completed.stdout[-2000:] + completed.stderr[-4000:]
    results = json.loads(report.read_text())
    for family in FAMILIES:
        results[family]["output_dir"] = root / family
    return results


def pieces_after_first_word(tokens: list[str], word_ids: list, first_word: int = 0) -> list[str]:
    return [token for token, word in zip(tokens, word_ids) if word is not None and word > first_word]


@pytest.mark.parametrize("family", FAMILIES)
def test_words_and_template_are_encoded_as_in_running_text(checkpoints, family, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[family])  # as train_pmner.py loads it
    # the probe is meaningful: byte-level BPE without add_prefix_space splits words as if each began the text
    assert split_words_match_running_text(tokenizer) is (family not in BYTE_LEVEL)
    # a light image processor whose settings are saved without weights (this test is about the tokenizer)
    image_processor = PMNERImageProcessor(
        detector=None, backbone="resnet18", backbone_weights="random:0", save_frr_weights=False
    )
    processor = PMNERProcessor(image_processor, tokenizer)
    assert split_words_match_running_text(processor.tokenizer)
    assert split_words_match_running_text(tokenizer) is (family not in BYTE_LEVEL)  # the caller's is not changed
    processor.save_pretrained(tmp_path)
    if family in BYTE_LEVEL:
        saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
        assert saved["add_prefix_space"] is True
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is PMNERProcessor and type(reloaded.tokenizer) is type(tokenizer)
    mask = tokenizer.mask_token
    # the tokens the tokenizer adds around a row ([CLS] ... [SEP], <s> ... </s>); not <unk> or <mask>
    specials = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}
    for loaded in (processor, reloaded):
        for words in SENTENCES:
            batch = loaded(words)
            ids = batch["input_ids"][0].tolist()
            tokens = tokenizer.convert_ids_to_tokens(ids)
            # (a) the sentence's words after the first: as in tokenizer(" ".join(words))
            running = tokenizer(" ".join(words), add_special_tokens=False, return_offsets_mapping=True)
            expected = [
                token for token, (_, end) in zip(
                    tokenizer.convert_ids_to_tokens(running["input_ids"]), running["offset_mapping"]
                )
                if end > len(words[0])
            ]
            assert pieces_after_first_word(tokens, batch.word_ids(0)) == expected
            # the whole row after the first word (sentence and template words, masks) as running text
            text = DEFAULT_PROMPT_TEMPLATE.format(sentence=" ".join(words), word=mask, mask=mask)
            running = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            expected = [
                token for token, (_, end) in zip(
                    tokenizer.convert_ids_to_tokens(running["input_ids"]), running["offset_mapping"]
                )
                if end > len(words[0]) or token == mask
            ]
            row = [
                token for token, token_id, word in zip(tokens, ids, batch.word_ids(0))
                if token_id not in specials and word != 0
            ]
            assert row == expected


def read_predictions(path) -> tuple[list[list[str]], list[list[str]]]:
    """Words and predicted tags of test_predictions.conll (word, gold, predicted per line)."""
    sentences, tags = [], []
    for line in open(path, encoding="utf-8").read().splitlines():
        if line.startswith("IMGID:"):
            sentences.append([])
            tags.append([])
        elif line.strip():
            word, _, predicted = line.split("\t")
            sentences[-1].append(word)
            tags[-1].append(predicted)
    return sentences, tags


@pytest.mark.parametrize("family", FAMILIES)
def test_one_epoch_of_train_pmner_and_the_folder_reloads(one_epoch_runs, checkpoints, family):
    run = one_epoch_runs[family]
    assert run["ok"], run.get("error")
    folder = run["output_dir"]
    results = json.loads((folder / "all_results.json").read_text())
    assert {"train_loss", "eval_f1", "predict_f1"} <= set(results)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    check_processor_matches_model(processor, model.config)
    assert type(processor.tokenizer) is type(AutoTokenizer.from_pretrained(checkpoints[family]))
    assert split_words_match_running_text(processor.tokenizer)
    # the saved tokenizer files themselves carry the setting (add_prefix_space for byte-level BPE)
    assert split_words_match_running_text(AutoTokenizer.from_pretrained(folder))
    assert model.config.text_config.model_type == json.loads(
        open(os.path.join(checkpoints[family], "config.json")).read()
    )["model_type"]
    # the reloaded folder predicts what the run wrote for the test split
    sentences, written = read_predictions(folder / "test_predictions.conll")
    batch = processor(sentences)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert processor.post_process_token_classification(logits, batch) == written
