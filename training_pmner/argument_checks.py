"""Checks of `train_pmner.py`'s arguments: they refuse, before anything loads, a run that would produce something
other than what was asked for (an untrained model, nothing at all) or that cannot run; the message names the
arguments."""

import json
import os

from .errors import ArgumentsError


DO_FLAGS = ("do_train", "do_eval", "do_predict")
SAMPLE_LIMITS = ("max_train_samples", "max_eval_samples", "max_predict_samples")

# what compute_metrics reports (seqeval micro scores, accuracy, F1 per entity type) and the Trainer's loss
GENERAL_METRICS = ("f1", "precision", "recall", "accuracy", "loss")
TYPE_METRICS = tuple(f"{name}_f1" for name in ("PER", "LOC", "ORG", "MISC", "OTHER"))
MAX_EPOCHS = 10_000


def check_training_numbers(training_args) -> None:
    """The `TrainingArguments` values that would only fail mid-run (or never): named, before anything loads."""
    explicit = getattr(training_args, "explicit_arguments", frozenset())
    if not training_args.learning_rate > 0:
        raise ArgumentsError(f"--learning_rate must be a positive number, got {training_args.learning_rate}")
    head_learning_rate = getattr(training_args, "head_learning_rate", None)
    if head_learning_rate is not None:
        if not 0 < head_learning_rate < float("inf"):
            raise ArgumentsError(f"--head_learning_rate must be a positive finite number, got {head_learning_rate}")
        from .optimizer import ungrouped_optimizer

        if ungrouped_optimizer(training_args.optim):
            raise ArgumentsError(
                f"--head_learning_rate needs an optimizer that takes parameter groups; --optim "
                f"{getattr(training_args.optim, 'value', training_args.optim)} builds its own"
            )
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise ArgumentsError(f"--{name} must be at least 1, got {getattr(training_args, name)}")
    if not 0 <= training_args.seed < 2**32:
        raise ArgumentsError(f"--seed must be in [0, 2**32), got {training_args.seed}")
    epochs = training_args.num_train_epochs
    if training_args.max_steps <= 0 and (epochs != epochs or not 0 <= epochs <= MAX_EPOCHS):  # steps: epochs unused
        raise ArgumentsError(f"--num_train_epochs must be a number in [0, {MAX_EPOCHS}], got {epochs}")
    if training_args.do_train and training_args.max_steps <= 0 and epochs == 0:
        raise ArgumentsError(
            "--do_train with --num_train_epochs 0 trains nothing (the model would be saved untrained): give at least "
            "a fraction of an epoch, or --max_steps"
        )
    if training_args.do_train and training_args.max_steps == 0 and "max_steps" in explicit:
        raise ArgumentsError("--do_train with --max_steps 0 trains nothing: give at least 1 step, or -1 for epochs")
    metric = training_args.metric_for_best_model or "f1"
    name = metric[len("eval_") :] if metric.startswith("eval_") else metric
    if name not in GENERAL_METRICS + TYPE_METRICS:
        raise ArgumentsError(
            f"--metric_for_best_model {metric!r} is not a metric this run reports: one of "
            f"{list(GENERAL_METRICS)} or a type's F1 ({', '.join(TYPE_METRICS)})"
        )


def none_detector(detector) -> bool:
    return detector is None or str(detector).lower() == "none"


def parse_detector_kwargs(value, detector) -> dict | None:
    """`--detector_kwargs` as a dict (a JSON object; a dict from a YAML/JSON argument file is taken as it is), checked
    against the torchvision builder on the meta device (no weights, no memory): an argument it does not take is an
    `ArgumentsError` naming it."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ArgumentsError(f"--detector_kwargs must be a JSON object, e.g. '{{\"box_score_thresh\": 0.0}}': {error}") from None
    if not isinstance(value, dict):
        raise ArgumentsError(f"--detector_kwargs must be a JSON object, got {type(value).__name__} {value!r}")
    if none_detector(detector):
        raise ArgumentsError("--detector_kwargs are arguments of the detector builder; --detector none builds none")
    from processing_pmner.image_frr_builders import check_detector_kwargs

    try:
        check_detector_kwargs(detector, value)
    except (TypeError, ValueError) as error:
        raise ArgumentsError(f"--detector_kwargs {json.dumps(value)}: {error}") from None
    return value


def requested_actions(training_args) -> list[str]:
    explicit = getattr(training_args, "explicit_arguments", frozenset(DO_FLAGS))
    return [flag for flag in DO_FLAGS if flag in explicit and getattr(training_args, flag)]


def check_untrained_evaluation(model_args, training_args, resumes_trained_folder: bool) -> None:
    """--do_eval / --do_predict without --do_train need a trained P-MNER to score."""
    if not training_args.do_train and not resumes_trained_folder:
        requested = requested_actions(training_args)
        raise ArgumentsError(
            f"{'/'.join('--' + flag for flag in requested)} without --do_train would score an untrained model: "
            f"--text_model_name_or_path {model_args.text_model_name_or_path!r} is not a P-MNER folder written by "
            "train_pmner.py (pass one to evaluate it, or add --do_train)"
        )


DATA_FILES = ("train_file", "validation_file", "test_file")


def check_data_files(data_args) -> None:
    """--train_file / --validation_file / --test_file: all three, in place of the benchmark's files."""
    given = [name for name in DATA_FILES if getattr(data_args, name)]
    if not given:
        return
    missing = [f"--{name}" for name in DATA_FILES if name not in given]
    if missing:
        raise ArgumentsError(
            f"--{given[0]} also needs {' and '.join(missing)}: a run uses the three splits (training, validation to "
            "choose the epoch, test)"
        )
    if data_args.data_dir:
        raise ArgumentsError(f"--data_dir and --{given[0]} both name the data: pass one of them")
    if data_args.dataset_name not in ("twitter2015", "twitter2017"):
        raise ArgumentsError(
            f"--{given[0]} is read with the tags of --dataset_name twitter2015 (with OTHER) or twitter2017; "
            f"got --dataset_name {data_args.dataset_name!r}"
        )
    for name in DATA_FILES:
        if not os.path.isfile(getattr(data_args, name)):
            raise ArgumentsError(f"--{name} {getattr(data_args, name)!r} is not a file")


def check_arguments(model_args, data_args, training_args, resumes_trained_folder: bool | None) -> None:
    """Refuses runs that would silently produce an untrained model, or that cannot run; the message names the
    arguments. `resumes_trained_folder`: --text_model_name_or_path is a P-MNER folder written by this script (`None`:
    not known yet, a Hub repository not downloaded; `check_untrained_evaluation` is then called once it is)."""
    if not requested_actions(training_args):
        raise ArgumentsError(
            "nothing to do: pass --do_train (train, choosing the epoch on validation), --do_eval (validation "
            "scores) and/or --do_predict (test scores, once), e.g. --do_train --do_eval --do_predict"
        )
    if resumes_trained_folder is not None:
        check_untrained_evaluation(model_args, training_args, resumes_trained_folder)
    check_data_files(data_args)
    workers = data_args.preprocessing_num_workers
    if workers is not None and workers < 1:
        raise ArgumentsError(f"--preprocessing_num_workers must be at least 1, got {workers}")
    for name in SAMPLE_LIMITS:
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise ArgumentsError(f"--{name} must be at least 1, got {value} (omit it to use the whole split)")
    if training_args.push_to_hub and not training_args.do_train:
        raise ArgumentsError(
            "--push_to_hub needs --do_train: an evaluation-only run has no newly trained model to publish"
        )
    if model_args.head == "linear" and model_args.prompt_mode == "cloze":
        raise ArgumentsError("--prompt_mode cloze needs --head verbalizer (the linear head has no mask to predict at)")
    if model_args.frr_weights_dtype not in ("float32", "bfloat16", "float16"):
        raise ArgumentsError(
            f"--frr_weights_dtype must be float32, bfloat16 or float16, got {model_args.frr_weights_dtype!r}"
        )
    check_training_numbers(training_args)
    if data_args.feature_cache_dir and os.path.exists(data_args.feature_cache_dir) and not os.path.isdir(
        data_args.feature_cache_dir
    ):
        raise ArgumentsError(f"--feature_cache_dir {data_args.feature_cache_dir} is a file, not a folder")
    from processing_pmner.image_frr_builders import builder_exists

    for name, value in (("detector", None if none_detector(model_args.detector) else model_args.detector),
                        ("backbone", model_args.backbone)):
        if value is not None and not builder_exists(value):
            raise ArgumentsError(f"--{name} {value!r} is not a torchvision model builder")
    model_args.detector_kwargs = parse_detector_kwargs(model_args.detector_kwargs, model_args.detector)
    if model_args.require_objects and none_detector(model_args.detector):
        raise ArgumentsError("--require_objects needs a detector: --detector none makes the whole image the only object")
    if data_args.feature_cache_dtype not in ("float32", "float16"):
        raise ArgumentsError(
            f"--feature_cache_dtype must be float32 or float16, got {data_args.feature_cache_dtype!r}"
        )
    if data_args.features_dataset and (data_args.image_dir or data_args.text_only):
        other = "--image_dir" if data_args.image_dir else "--text_only"
        raise ArgumentsError(f"--features_dataset and {other} both say where the visual input comes from: pass one of them")
    if data_args.features_dataset and data_args.feature_cache_dir:
        raise ArgumentsError(
            "--feature_cache_dir caches the features extracted from --image_dir; --features_dataset brings its own: "
            "drop one of them"
        )
    if data_args.features_dataset and "feature_cache_dtype" in getattr(training_args, "explicit_arguments", ()):
        raise ArgumentsError(
            "--feature_cache_dtype is the dtype of the cache of features extracted from --image_dir; --features_dataset "
            "brings its features in its own dtype: drop --feature_cache_dtype"
        )
    if data_args.retrieval_context < 0:
        raise ArgumentsError(f"--retrieval_context must be 0 (off) or a number of neighbours, got {data_args.retrieval_context}")
    if data_args.retrieval_context and data_args.context_file:
        raise ArgumentsError("--retrieval_context and --context_file both fill the context: pass one of them")
    if data_args.retrieval_encoder and not data_args.retrieval_context:
        raise ArgumentsError("--retrieval_encoder is the encoder of --retrieval_context K: pass that too")
    if data_args.context_file and data_args.dataset_name not in ("twitter2015", "twitter2017"):
        raise ArgumentsError(
            f"--context_file fills the context column of the CoNLL benchmarks; the Hub dataset "
            f"{data_args.dataset_name!r} needs a 'context' column in its own files"
        )
    if data_args.context_description and not data_args.context_file:
        raise ArgumentsError("--context_description describes --context_file: pass that too")
    if data_args.dataset_name not in ("twitter2015", "twitter2017") and not data_args.dataset_config_name:
        raise ArgumentsError(
            f"--dataset_name {data_args.dataset_name!r} is a Hub dataset repository: also pass --dataset_config_name "
            "twitter2015 or twitter2017"
        )
