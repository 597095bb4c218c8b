"""The model card `train_pmner.py` writes, read back by `huggingface_hub.ModelCard` as the Hub reads it."""

from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from training_pmner.publishing import CANONICAL_DATASET, write_model_card


RESULTS = {
    "eval_precision": 0.61, "eval_recall": 0.52, "eval_f1": 0.5614,
    "predict_precision": 0.58, "predict_recall": 0.49, "predict_f1": 0.5312, "train_runtime": 12.0,
}


def write_card(tmp_path, dataset_name, config_name, hub_dataset, results=RESULTS, trained_here=True,
               text_model="google-bert/bert-base-uncased", train_file=None):
    output_dir = tmp_path / "out"
    output_dir.mkdir(exist_ok=True)
    write_model_card(
        str(output_dir),
        results=dict(results),
        report=None,
        model_args=SimpleNamespace(text_model_name_or_path=text_model),
        data_args=SimpleNamespace(
            dataset_name=dataset_name, dataset_config_name=config_name, other_as_misc=True, train_file=train_file
        ),
        training_args=SimpleNamespace(
            hub_model_id="user/pmner-test", num_train_epochs=3, per_device_train_batch_size=8, world_size=1,
            learning_rate=5e-5, seed=1, device="cpu",
        ),
        num_examples={"train": 10, "validation": 4, "test": 4},
        frr_settings={},
        use_visual=False,
        hub_dataset=hub_dataset,
        trained_here=trained_here,
        argv=["--do_train"],
        model_settings={"fusion": "tcfm", "head": "mlm", "tag_scheme": "BIO", "prompt_mode": "token"},
    )
    return ModelCard.load(str(output_dir / "README.md"))


def scores_of(card) -> dict:
    return {(r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}


def test_a_hub_dataset_is_named_by_its_id_and_config(tmp_path):
    card = write_card(tmp_path, "user/twitter-mner", "twitter2017", hub_dataset="user/twitter-mner")
    assert card.data.datasets == ["user/twitter-mner"]
    assert scores_of(card) == {
        ("user/twitter-mner", "twitter2017", "test", "precision"): 0.58,
        ("user/twitter-mner", "twitter2017", "test", "recall"): 0.49,
        ("user/twitter-mner", "twitter2017", "test", "f1"): 0.5312,
    }
    assert {r.task_type for r in card.data.eval_results} == {"token-classification"}
    assert card.data.pipeline_tag == "token-classification"
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.model_name == "user/pmner-test"


def test_local_benchmark_files_are_named_by_the_builder_and_benchmark(tmp_path):
    results = {key: value for key, value in RESULTS.items() if not key.startswith("predict_")}
    card = write_card(tmp_path, "twitter2015", None, hub_dataset=None, results=results)
    assert card.data.datasets == [CANONICAL_DATASET]
    # without a test evaluation the validation scores are reported, under their own split
    assert scores_of(card) == {
        (CANONICAL_DATASET, "twitter2015", "validation", "precision"): 0.61,
        (CANONICAL_DATASET, "twitter2015", "validation", "recall"): 0.52,
        (CANONICAL_DATASET, "twitter2015", "validation", "f1"): 0.5614,
    }
    assert {r.dataset_name for r in card.data.eval_results} == {"Twitter-2015"}


@pytest.mark.parametrize("trained_here", [True, False])
def test_base_model_is_the_text_model_only_when_trained_here(tmp_path, trained_here):
    card = write_card(tmp_path, "twitter2017", None, hub_dataset=None, trained_here=trained_here)
    assert card.data.base_model == ("google-bert/bert-base-uncased" if trained_here else None)


def test_conll_files_given_by_path_are_not_named_as_the_benchmark(tmp_path):
    card = write_card(tmp_path, "twitter2017", None, hub_dataset=None, train_file=str(tmp_path / "my-train.txt"))
    assert card.data.datasets == [CANONICAL_DATASET]
    assert {(r.dataset_type, r.dataset_config) for r in card.data.eval_results} == {(CANONICAL_DATASET, "custom")}
    assert {r.dataset_name for r in card.data.eval_results} == {"CoNLL files (`my-train.txt`, ...) with Twitter-2017's tags"}
