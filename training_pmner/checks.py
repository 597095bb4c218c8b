"""Refusals of `train_pmner.py` that need more than its arguments: its folders (`check_paths`), a checkpoint or a
trained folder that holds another model than this run's (`check_resumable`, `check_folder_switches`,
`check_folder_processor`), and settings the text model or the data cannot take. Each raises an `ArgumentsError` that
names what differs."""

import json
import os
import sys

from processing_pmner.image_settings import FEATURE_SETTINGS, SETTINGS as IMAGE_SETTINGS, feature_settings

from .errors import ArgumentsError
from .checkpoints import check_checkpoint, intact_checkpoint, saved_image_processor
from .context import check_same_context
from .data import is_pmner_folder
from .optimizer import check_same_head_learning_rate
from .publishing import frr_weights_are_random


def none_if_none(value):
    """`None` for a setting given as 'none' (--detector none), else the value."""
    return None if value is None or str(value).lower() == "none" else value


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as handle:
        return json.load(handle)


def settings_error(what: str, error: Exception) -> ArgumentsError:
    return ArgumentsError(f"{what}: {error}")


# What a run writes as its results: removed from an output folder before a new run writes its own, so that a card or
# a push never reports an earlier run's numbers.
RESULT_FILES = (
    "all_results.json", "train_results.json", "eval_results.json", "predict_results.json", "predict_report.txt",
    "test_predictions.conll",
)
# Files an output folder may hold besides a previous run of this script (written by the benchmark runners).
FOREIGN_ALLOWED = ("experiment.json", "frr_cache")


def same_path(first: str, second: str) -> bool:
    if os.path.abspath(first) == os.path.abspath(second):
        return True
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)


def check_paths(model_args, data_args, training_args, text_model: str) -> None:
    """The output folder may not be one of the run's inputs (it would overwrite a trained model's card, or mix the
    run's files into the data)."""
    for name, path in (
        ("--text_model_name_or_path", text_model),
        ("--data_dir", data_args.data_dir if data_args.data_dir != "auto" else None),
        ("--image_dir", data_args.image_dir),
        ("--features_dataset", data_args.features_dataset),  # a local folder (a Hub id is no folder here)
    ):
        if path and same_path(training_args.output_dir, path):
            raise ArgumentsError(f"--output_dir {training_args.output_dir!r} is the same folder as {name}: choose another")
    if os.path.exists(training_args.output_dir) and not os.path.isdir(training_args.output_dir):
        raise ArgumentsError(f"--output_dir {training_args.output_dir!r} exists and is not a folder")
    if os.path.isdir(training_args.output_dir) and not holds_only_runs(training_args.output_dir):
        raise ArgumentsError(
            f"--output_dir {training_args.output_dir!r} is not empty and holds no earlier train_pmner.py run: its files "
            "would be overwritten (README.md) or published; choose a new or empty folder"
        )
    if data_args.context_file and not os.path.isfile(data_args.context_file):
        raise ArgumentsError(f"--context_file {data_args.context_file!r} is not a file")
    for name, path in (("--data_dir", data_args.data_dir), ("--image_dir", data_args.image_dir)):
        if path and path != "auto" and not os.path.isdir(path) and not (name == "--image_dir" and data_args.text_only):
            raise ArgumentsError(f"{name} {path!r} is not a folder")
    checkpoint = training_args.resume_from_checkpoint
    if isinstance(checkpoint, str) and checkpoint.lower() in ("true", "false"):
        # TrainingArguments keeps the text; the Trainer takes only a real True as "the last checkpoint"
        latest = None
        if checkpoint.lower() == "true":
            latest = newest_intact_checkpoint(training_args.output_dir)
            if latest is None:
                raise ArgumentsError(f"--resume_from_checkpoint true: no checkpoint in {training_args.output_dir!r}")
        training_args.resume_from_checkpoint = latest
    elif isinstance(checkpoint, str):
        if not os.path.isfile(os.path.join(checkpoint, "config.json")) and not os.path.isdir(checkpoint):
            raise ArgumentsError(f"--resume_from_checkpoint {checkpoint!r}: no checkpoint there (no config.json)")
        try:
            check_checkpoint(checkpoint)
        except ValueError as error:
            raise ArgumentsError(str(error)) from error


def newest_intact_checkpoint(output_dir: str, warn: bool = True) -> str | None:
    """The checkpoint a run in `output_dir` resumes from: the newest intact one (broken newer ones are named in a
    warning, by the main process); an `ArgumentsError` naming the files when every checkpoint there is broken."""
    def say(message):
        if warn:
            print(f"train_pmner.py: warning: {message}", file=sys.stderr)

    try:
        return intact_checkpoint(output_dir, say)
    except ValueError as error:
        raise ArgumentsError(str(error)) from error


def holds_only_runs(folder: str) -> bool:
    """True for an empty folder or one whose files come from runs of this script (a model folder, checkpoints,
    results, the feature cache, a benchmark runner's experiment.json)."""
    names = set(os.listdir(folder)) - set(FOREIGN_ALLOWED)
    if not names:
        return True
    markers = {"trainer_state.json", *RESULT_FILES}
    return bool(names & markers) or any(name.startswith("checkpoint-") for name in names) or is_pmner_folder(folder)


# Settings that make a checkpoint or a trained folder a different model: resuming or continuing with other values
# is refused, naming both.
MODEL_IDENTITY = (
    "head", "tag_scheme", "fusion", "use_visual", "verbalizer_trainable", "fusion_num_heads", "max_objects",
    "visual_feature_dim", "id2label",
)
TEXT_MODEL_IDENTITY = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def identity_of(config: dict) -> dict:
    """The MODEL_IDENTITY settings of a config (labels as a list in id order)."""
    identity = {key: config.get(key) for key in MODEL_IDENTITY}
    id2label = identity.pop("id2label") or {}
    identity["labels"] = [id2label[key] for key in sorted(id2label, key=int)]
    text_config = config.get("text_config") or {}
    identity["text_model"] = {key: text_config.get(key) for key in TEXT_MODEL_IDENTITY}
    return identity


def check_same_model(source: str, saved: dict, wanted: dict) -> None:
    """Refuses to go on from `source` (a checkpoint or a trained folder) when it is another kind of model."""
    saved, wanted = identity_of(saved), identity_of(wanted)
    refuse_differences(
        f"{source} holds a model with", saved, wanted, "use the same settings, or another --output_dir to start over"
    )


def check_same_features(checkpoint: str, image_processor) -> None:
    """Refuses to resume a visual run from `checkpoint` when its saved image processor gives other features than
    this run's (a setting of FEATURE_SETTINGS differs: the model would go on training on other input). A checkpoint
    without a saved processor is not checked."""
    saved = saved_image_processor(checkpoint)
    if saved is None:
        return
    saved = {key: saved.get(key, IMAGE_SETTINGS[key]) for key in FEATURE_SETTINGS}  # settings added later: defaults
    wanted = feature_settings(image_processor)  # crop_size resolved
    if saved["crop_size"] is None and saved["backbone"] == wanted["backbone"]:  # the backbone's own crop size
        saved["crop_size"] = wanted["crop_size"]
    refuse_differences(f"checkpoint {checkpoint} was trained on the features of", saved, wanted,
                       "use the same FRR settings, or another --output_dir to start over")


def refuse_differences(subject: str, saved: dict, wanted: dict, hint: str) -> None:
    """A `mismatch` naming every key whose saved value differs from the wanted one (none: nothing happens)."""
    differ = [key for key in saved if saved[key] != wanted[key]]
    if differ:
        saved_values = [f"{key}={saved[key]!r}" for key in differ]
        raise mismatch(subject, saved_values, [f"{key}={wanted[key]!r}" for key in differ], hint)


def mismatch(subject: str, saved: list[str], wanted: list[str], hint: str) -> ArgumentsError:
    """'<subject> a=1, b=2; this run asks for a=3, b=4 (<hint>)'."""
    return ArgumentsError(f"{subject} {', '.join(saved)}; this run asks for {', '.join(wanted)} ({hint})")


def check_resumable(checkpoint: str, model_config: dict, processor, training_args, use_visual: bool) -> None:
    """Refuses to resume from `checkpoint` when it holds another model, was trained on other features or another
    context, or with another --head_learning_rate."""
    check_same_model(f"checkpoint {checkpoint}", read_config(checkpoint), model_config)
    if use_visual:
        check_same_features(checkpoint, processor.image_processor)
    check_same_context(checkpoint, processor.context_source)
    check_same_head_learning_rate(checkpoint, training_args)


# Model switches that a trained folder fixes: given explicitly with another value, the run is refused.
FOLDER_SWITCHES = ("fusion", "head", "tag_scheme", "verbalizer_trainable", "fusion_num_heads")
# FRR settings a trained folder's image processor keeps (its features are what the model was trained on)
FOLDER_FRR_SETTINGS = (
    "detector", "backbone", "feature_layer", "grid_size", "score_threshold", "max_objects", "crop_size", "add_whole_image",
)


def check_folder_switches(text_model: str, saved: dict, model_args, explicit) -> None:
    """Refuses a switch given explicitly with another value than the trained folder `text_model` has (`saved`: its
    config)."""
    differ = [name for name in FOLDER_SWITCHES if name in explicit and saved.get(name) != getattr(model_args, name)]
    if differ:
        raise mismatch(
            f"{text_model} is a trained P-MNER with",
            [f"{name}={saved.get(name)!r}" for name in differ],
            [f"--{name} {getattr(model_args, name)}" for name in differ],
            "a trained folder keeps its own switches: start from a masked LM to change them",
        )


def check_folder_processor(text_model: str, saved: dict, processor, model_args, explicit, use_visual: bool) -> None:
    """Refuses a processor or FRR setting given explicitly with another value than the trained folder's processor
    has, and a run with or without images unlike the folder's model (`saved`: its config)."""
    kept = {"prompt_mode": processor.prompt_mode, "prompt_template": processor.prompt_template,
            "max_seq_length": processor.max_length}
    kept.update({name: getattr(processor.image_processor, name) for name in FOLDER_FRR_SETTINGS})
    wanted = {name: getattr(model_args, name) for name in kept} | {"detector": none_if_none(model_args.detector)}
    differ = [name for name in kept if name in explicit and kept[name] != wanted[name]]
    if differ:
        raise mismatch(
            f"{text_model} has a processor with",
            [f"{name}={kept[name]!r}" for name in differ],
            [f"--{name} {getattr(model_args, name)}" for name in differ],
            "a trained folder keeps its own processor: start from a masked LM to change it",
        )
    if saved.get("use_visual", True) != use_visual:
        raise ArgumentsError(
            f"{text_model} was trained with use_visual={saved.get('use_visual', True)}; this run has "
            f"use_visual={use_visual} (--text_only / --image_dir)"
        )


# encoders whose position ids start after the padding index (RoBERTa's scheme): padding_idx + 1 positions unused
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart", "data2vec-text")


def text_model_limit(tokenizer, text_config) -> int | None:
    """The most tokens the text encoder takes: the smaller of its usable position embeddings and the tokenizer's
    `model_max_length` (where it is set)."""
    limits = []
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(text_config, "model_type", "") in OFFSET_POSITIONS:
            positions -= (getattr(text_config, "pad_token_id", None) or 0) + 1
        limits.append(positions)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        limits.append(limit)
    return min(limits) if limits else None


def check_max_seq_length(model_args, tokenizer, text_config) -> None:
    """--max_seq_length may not be more than the text model takes."""
    limit = text_model_limit(tokenizer, text_config)
    if limit is not None and model_args.max_seq_length > limit:
        raise ArgumentsError(
            f"--max_seq_length {model_args.max_seq_length} is more than the {limit} tokens the text model "
            f"{model_args.text_model_name_or_path} takes"
        )


def check_data(raw, data_args, use_visual: bool) -> None:
    """Refuses a visual run on a dataset without images, and more retrieval neighbours than training tweets."""
    if use_visual and not data_args.features_dataset and "image" not in raw["train"].column_names:
        raise ArgumentsError(f"--dataset_name {data_args.dataset_name!r} has no image column; pass --text_only")
    if data_args.retrieval_context > len(raw["train"]):
        raise ArgumentsError(
            f"--retrieval_context {data_args.retrieval_context} asks for more neighbours than the {len(raw['train'])} "
            "training tweets"
        )


def check_entity_types(bio_names: list[str], entity_types: list[str], text_model: str) -> None:
    """Refuses data with an entity type that the model does not tag."""
    missing_types = sorted({name.split("-", 1)[1] for name in bio_names if name != "O"} - set(entity_types))
    if missing_types:
        raise ArgumentsError(
            f"the data has the entity types {missing_types} that the model {text_model} does not tag "
            f"(its types: {entity_types}; see --other_as_misc)"
        )


def check_publishable_frr(training_args, image_processor, use_visual: bool) -> None:
    """Refuses to push a visual model with random FRR weights unless --hub_allow_random_frr_weights says so."""
    random_frr = frr_weights_are_random(image_processor) if use_visual else []
    if training_args.push_to_hub and random_frr and not training_args.hub_allow_random_frr_weights:
        raise ArgumentsError(
            f"--push_to_hub would publish a visual model with random FRR weights ({', '.join(random_frr)}): pass "
            "pretrained weights, or --hub_allow_random_frr_weights to publish it anyway"
        )
