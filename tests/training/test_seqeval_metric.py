"""Tests of the offline seqeval metric against hand-computed scores."""

import os
import subprocess
import sys
import textwrap

import evaluate
import pytest

import training_pmner.seqeval_metric as seqeval_metric
from training_pmner.seqeval_metric import compute_ner_scores, load_seqeval_metric, ner_classification_report


# Gold entities: PER (s0 0-1), LOC (s0 3), ORG (s1 0-1, starts with I- and no B-), MISC (s2 0)   -> 4
# Predicted:     PER (s0 0-1), ORG (s0 3),  ORG (s1 0-1)                                           -> 3
# Correct: PER and the I- ORG -> 2.  P = 2/3, R = 2/4, F1 = 4/7.  Tokens: 7 of 9 right.
REFERENCES = [["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "I-ORG", "O"], ["B-MISC", "O"]]
PREDICTIONS = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "I-ORG", "O"], ["O", "O"]]
EXPECTED = {
    "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1},
    "MISC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1},
    "ORG": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "number": 1},
    "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1},
    "overall_precision": 2 / 3,
    "overall_recall": 0.5,
    "overall_f1": 4 / 7,
    "overall_accuracy": 7 / 9,
}


def assert_scores(scores, expected):
    assert set(scores) == set(expected)
    for key, value in expected.items():
        if isinstance(value, dict):
            assert scores[key]["number"] == value["number"] and isinstance(scores[key]["number"], int)
            for name in ("precision", "recall", "f1"):
                assert scores[key][name] == pytest.approx(value[name]), (key, name)
        else:
            assert scores[key] == pytest.approx(value), key
            assert type(scores[key]) is float


def test_hand_computed_scores():
    assert_scores(compute_ner_scores(PREDICTIONS, REFERENCES), EXPECTED)


def test_i_without_b_is_an_entity_in_default_mode_only():
    references = [["O", "I-PER", "I-PER", "O"]]
    scores = compute_ner_scores([["O", "B-PER", "I-PER", "O"]], references)
    # Default (conlleval) mode: gold "I-PER I-PER" is one PER entity spanning the same tokens: a match.
    assert scores["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1}
    # A prediction starting with I- is an entity too.
    assert compute_ner_scores(references, references)["overall_f1"] == 1.0
    # Strict IOB2 does not see the I- entity at all.
    strict = compute_ner_scores([["O", "B-PER", "I-PER", "O"]], references, mode="strict", scheme="IOB2")
    assert strict["PER"]["number"] == 0 and strict["overall_precision"] == 0.0


def test_type_change_inside_a_span_starts_a_new_entity():
    # "B-PER I-LOC": PER (0) and LOC (1) in default mode; the prediction gets PER right and LOC wrong.
    scores = compute_ner_scores([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]])
    assert scores["PER"]["number"] == 1 and scores["LOC"]["number"] == 1
    assert scores["PER"]["recall"] == 0.0  # predicted PER spans two tokens, gold PER one
    assert scores["overall_precision"] == 0.0 and scores["overall_accuracy"] == 0.5


def test_no_entities_anywhere():
    scores = compute_ner_scores([["O", "O"]], [["O", "O"]])
    assert scores == {"overall_precision": 0.0, "overall_recall": 0.0, "overall_f1": 0.0, "overall_accuracy": 1.0}


def test_input_checks():
    with pytest.raises(ValueError, match="2 predicted sequences but 1 reference"):
        compute_ner_scores([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="sequence 1: 1 predicted tags but 2 reference tags"):
        compute_ner_scores([["O"], ["O"]], [["O"], ["O", "O"]])
    with pytest.raises(TypeError, match="map label ids first"):
        compute_ner_scores([[0]], [["O"]])
    with pytest.raises(ValueError, match="no sequences"):
        compute_ner_scores([], [])
    with pytest.raises(ValueError, match="scheme must be one of"):
        compute_ner_scores([["O"]], [["O"]], mode="strict", scheme="BIO")


def test_classification_report_text():
    report = ner_classification_report(PREDICTIONS, REFERENCES, digits=4)
    lines = {line.split()[0]: line.split()[1:] for line in report.splitlines() if line.strip()}
    assert lines["ORG"] == ["0.5000", "1.0000", "0.6667", "1"]
    assert lines["PER"] == ["1.0000", "1.0000", "1.0000", "1"]
    assert lines["micro"] == ["avg", "0.6667", "0.5000", "0.5714", "4"]


def test_evaluate_load_by_path_in_process():
    metric = evaluate.load(seqeval_metric.__file__)
    assert isinstance(metric, evaluate.Metric)
    for prediction, reference in zip(PREDICTIONS, REFERENCES):
        metric.add(predictions=prediction, references=reference)
    assert_scores(metric.compute(), EXPECTED)
    assert_scores(load_seqeval_metric().compute(predictions=PREDICTIONS, references=REFERENCES), EXPECTED)


def test_evaluate_load_by_path_offline(tmp_path):
    script = textwrap.dedent(
        f"""
        import evaluate, training_pmner.seqeval_metric as m
        metric = evaluate.load(m.__file__)
        scores = metric.compute(predictions={PREDICTIONS!r}, references={REFERENCES!r})
        print(round(scores["overall_f1"], 6), scores["ORG"]["number"])
        """
    )
    env = dict(
        os.environ,
        HF_EVALUATE_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),  # a fresh modules cache: nothing preloaded
        HF_ENDPOINT="http://127.0.0.1:9",  # any Hub request would fail
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(round(4 / 7, 6)), "1"]
