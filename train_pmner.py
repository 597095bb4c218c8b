#!/usr/bin/env python
"""Train P-MNER on Twitter-2015 or Twitter-2017 with the Hugging Face Trainer (Accelerate underneath).

Selects the best epoch on the validation split, evaluates the test split once for that model, and writes a folder
that loads back with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

    python train_pmner.py --dataset_name twitter2017 --data_dir ../shared/data/twitter2017 \
        --text_model_name_or_path bert-base-uncased --image_dir twitter2017_images --output_dir runs/t17 \
        --do_train --do_eval --do_predict
    python train_pmner.py --model_name_or_path bert-base-uncased --model_revision main --train_file train.txt \
        --validation_file valid.txt --test_file test.txt --image_dir images --output_dir runs/mine --do_train ...
    accelerate launch train_pmner.py config.yaml
    torchrun --nproc_per_node 2 train_pmner.py --use_cpu ...
    accelerate launch --multi_gpu --num_processes 2 train_pmner.py ... --use_cpu   # 2 CPU processes

(`accelerate launch --num_processes 2 --cpu` starts ONE process; the script warns when it sees that.) run_ner.py's
arguments are taken where they apply (--model_name_or_path, --cache_dir, --model_revision, --token,
--trust_remote_code, --train_file / --validation_file / --test_file, --preprocessing_num_workers, --overwrite_cache,
--max_*_samples); the others are refused with the reason.

At least one of --do_train, --do_eval, --do_predict is required; --do_eval / --do_predict without --do_train score a
trained P-MNER folder given as --text_model_name_or_path.
"""

import errno
import json
import logging
import os
import shutil
import sys
import time

import datasets
import transformers
from transformers import AutoConfig, AutoTokenizer, TrainerCallback, set_seed

from modeling_pmner import PMNERConfig, PMNERForTokenClassification
from processing_pmner import PMNERImageProcessor, PMNERProcessor
from training_pmner.context_files import ContextFileError
from processing_pmner.image_processing_pmner import FEATURE_SETTINGS, SETTINGS as IMAGE_SETTINGS, feature_settings
from training_pmner.twitter_mner import TwitterMNERFormatError
from training_pmner.twitter_mner_hub import hub_transport_errors
from processing_pmner.pipeline_pmner import add_pipeline_to_folder
from predict_pmner.cli import unstarted_processes_warning
from processing_pmner.text_retrieval_context import ENCODER_FOLDER, INDEX_RECORD, INDEX_WEIGHTS
from processing_pmner.processing_pmner import DEFAULT_PROMPT_TEMPLATE, check_processor_matches_model
from training_pmner.seqeval_metric import load_seqeval_metric, ner_classification_report
from training_pmner.arguments import (
    ArgumentsError,
    DataArguments,
    DataTrainingArguments,
    ModelArguments,
    PMNERTrainingArguments,
    check_arguments,
    check_untrained_evaluation,
    parse_arguments,
    set_file_defaults,
)
from training_pmner.checkpoints import check_checkpoint, intact_checkpoint, saved_image_processor, set_aside_broken
from training_pmner.optimizer import PMNERTrainer, check_same_head_learning_rate
from training_pmner.context import check_same_context, prepare_context
from training_pmner.features_dataset import FeaturesDatasetError, attach_features_dataset
from training_pmner.data import (
    OFFLINE_MINILM,
    PMNERDataCollator,
    download_text_model,
    entity_types_of,
    hub_kwargs,
    hub_id_of_text_model,
    is_pmner_folder,
    load_raw_data,
    resolve_data_dir,
    resolve_text_model,
    no_object_message,
    visual_statistics,
)
from training_pmner.publishing import (
    HubStrategyCallback,
    PushError,
    frr_weights_are_random,
    prepare_hub_repo,
    push_output_folder,
    write_model_card,
)


logger = logging.getLogger(__name__)

__all__ = [  # what tests and benchmarks import from this script
    "ArgumentsError", "DataArguments", "DataTrainingArguments", "ModelArguments", "OFFLINE_MINILM", "PMNERDataCollator", "PMNERTrainingArguments",
    "main", "parse_arguments", "resolve_data_dir", "resolve_text_model", "set_file_defaults",
]

# Bump when `encode` changes what it writes, so that cached encodings of an older version are not reused.
ENCODING_VERSION = 1

# Settings that make a checkpoint or a trained folder a different model: resuming or continuing with other values
# is refused, naming both.
MODEL_IDENTITY = (
    "head", "tag_scheme", "fusion", "use_visual", "verbalizer_trainable", "fusion_num_heads", "max_objects",
    "visual_feature_dim", "id2label",
)
TEXT_MODEL_IDENTITY = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
# What a run writes as its results: removed from an output folder before a new run writes its own, so that a card or
# a push never reports an earlier run's numbers.
RESULT_FILES = (
    "all_results.json", "train_results.json", "eval_results.json", "predict_results.json", "predict_report.txt",
    "test_predictions.conll",
)
# Files an output folder may hold besides a previous run of this script (written by the benchmark runners).
FOREIGN_ALLOWED = ("experiment.json", "frr_cache")


class EpochTimerCallback(TrainerCallback):
    """Logs the wall time of each epoch and the validation F1, so a CPU run shows that it is alive; warns when the
    warm-up covers every step (the learning rate would stay below its peak the whole run, 0 for a one-step run)."""

    def on_train_begin(self, args, state, control, **kwargs):
        warmup = args.get_warmup_steps(state.max_steps) if state.max_steps else 0
        if state.is_world_process_zero and state.max_steps and warmup >= state.max_steps:
            logger.warning(
                f"--warmup_steps {args.warmup_steps} gives {warmup} warm-up steps for a run of {state.max_steps} "
                "optimizer steps: the learning rate never reaches its peak (a one-step run does not change the "
                "weights). Pass fewer warm-up steps, or more data / epochs."
            )

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            logger.info(f"epoch {state.epoch:.2f} trained in {time.perf_counter() - self.start:.1f} s")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics and "eval_f1" in metrics:
            logger.info(
                f"epoch {state.epoch:.2f}: validation P {metrics['eval_precision']:.4f} "
                f"R {metrics['eval_recall']:.4f} F1 {metrics['eval_f1']:.4f}"
            )


def none_if_none(value):
    return None if value is None or str(value).lower() == "none" else value


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


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as handle:
        return json.load(handle)


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


# Model switches that a trained folder fixes: given explicitly with another value, the run is refused.
FOLDER_SWITCHES = ("fusion", "head", "tag_scheme", "verbalizer_trainable", "fusion_num_heads")
# FRR settings a trained folder's image processor keeps (its features are what the model was trained on)
FOLDER_FRR_SETTINGS = (
    "detector", "backbone", "feature_layer", "grid_size", "score_threshold", "max_objects", "crop_size", "add_whole_image",
)


def settings_error(what: str, error: Exception) -> ArgumentsError:
    return ArgumentsError(f"{what}: {error}")


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


def build_model_and_processor(model_args, explicit, text_model, trained_folder, use_visual, entity_types):
    """A fresh P-MNER on a pretrained masked LM with a new processor, or a trained P-MNER folder with its own.

    Everything cheap comes first and is checked (the text model's config and tokenizer, the P-MNER config, the
    processor and, for a visual run, the FRR networks with their weights), so that a bad setting stops the run
    with one line naming it before the text model's weights load or any image is read."""
    if trained_folder:
        saved = read_config(text_model)
        differ = [name for name in FOLDER_SWITCHES if name in explicit and saved.get(name) != getattr(model_args, name)]
        if differ:
            raise mismatch(
                f"{text_model} is a trained P-MNER with",
                [f"{name}={saved.get(name)!r}" for name in differ],
                [f"--{name} {getattr(model_args, name)}" for name in differ],
                "a trained folder keeps its own switches: start from a masked LM to change them",
            )
        try:
            processor = PMNERProcessor.from_pretrained(text_model)  # refuses tags other than config.json's
        except (OSError, ValueError) as error:
            raise settings_error(text_model, error) from error
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
        build_frr(processor.image_processor, use_visual, text_model)
        try:
            model = PMNERForTokenClassification.from_pretrained(text_model)
            check_processor_matches_model(processor, model.config)
        except (OSError, ValueError) as error:
            raise settings_error(text_model, error) from error
        logger.info(f"Loaded the trained P-MNER model and processor of {text_model}")
        return model, processor

    try:  # a local folder by now (a Hub repository was downloaded at --model_revision)
        remote_code = {"trust_remote_code": model_args.trust_remote_code}
        text_config = AutoConfig.from_pretrained(text_model, **remote_code)
        tokenizer = AutoTokenizer.from_pretrained(text_model, **remote_code)
    except (OSError, ValueError) as error:
        raise settings_error(f"--text_model_name_or_path {model_args.text_model_name_or_path}", error) from error
    try:
        image_processor = PMNERImageProcessor(
            detector=none_if_none(model_args.detector),
            detector_weights=model_args.detector_weights,
            detector_kwargs=model_args.detector_kwargs,
            backbone=model_args.backbone,
            feature_layer=model_args.feature_layer,
            grid_size=model_args.grid_size,
            backbone_weights=model_args.backbone_weights,
            score_threshold=model_args.score_threshold,
            max_objects=model_args.max_objects,
            crop_size=model_args.crop_size,
            add_whole_image=model_args.add_whole_image,
            save_frr_weights=use_visual,  # a text-only model carries no FRR weights
            frr_weights_dtype=model_args.frr_weights_dtype,
        )
        config_kwargs = dict(
            use_visual=use_visual,
            fusion=model_args.fusion,
            head=model_args.head,
            tag_scheme=model_args.tag_scheme,
            entity_types=entity_types,
            verbalizer_trainable=model_args.verbalizer_trainable,
            fusion_num_heads=model_args.fusion_num_heads,
            visual_feature_dim=image_processor.feature_dim,
            max_objects=image_processor.max_objects,
        )
        config = PMNERConfig(text_config=text_config, **config_kwargs)  # checks the switches; no weights
        template = model_args.prompt_template or (
            DEFAULT_PROMPT_TEMPLATE if model_args.head == "verbalizer" else "{sentence}"
        )
        processor = PMNERProcessor(
            image_processor,
            tokenizer,
            prompt_template=template,
            prompt_mode=model_args.prompt_mode,
            label_names=[config.id2label[i] for i in range(config.num_labels)],
            max_length=model_args.max_seq_length,
        )
    except ValueError as error:  # the settings' own checks (PMNERConfig, PMNERProcessor, PMNERImageProcessor)
        raise ArgumentsError(str(error)) from error
    limit = text_model_limit(tokenizer, text_config)
    if limit is not None and model_args.max_seq_length > limit:
        raise ArgumentsError(
            f"--max_seq_length {model_args.max_seq_length} is more than the {limit} tokens the text model "
            f"{model_args.text_model_name_or_path} takes"
        )
    build_frr(image_processor, use_visual, "the FRR settings")
    try:
        model = PMNERForTokenClassification.from_text_pretrained(text_model, tokenizer=tokenizer, **config_kwargs)
    except (OSError, ValueError) as error:
        raise settings_error(f"--text_model_name_or_path {model_args.text_model_name_or_path}", error) from error
    # config.json names the encoder by its Hub id or its folder's base name, never a path of this machine
    model.config.text_config._name_or_path = hub_id_of_text_model(model_args.text_model_name_or_path) or (
        os.path.basename(os.path.normpath(text_model))
    )
    return model, processor


def build_frr(image_processor, use_visual: bool, source: str) -> None:
    """Builds a visual run's FRR networks now (their weights read and checked, or downloaded), before any image."""
    if not use_visual:
        return
    try:
        image_processor.load_models("cpu")
    except (OSError, ValueError) as error:  # weights missing, unreadable, altered, of another model, not downloadable
        raise settings_error(f"FRR networks of {source}", error) from error


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    warning = unstarted_processes_warning("train_pmner.py", "train_pmner.py ... --use_cpu")
    if warning:
        print(warning, file=sys.stderr)
    try:
        model_args, data_args, training_args = parse_arguments(argv)
        text_model = resolve_text_model(model_args.text_model_name_or_path)
        on_hub = not os.path.isdir(text_model)
        check_arguments(model_args, data_args, training_args, resumes_trained_folder=None if on_hub else is_pmner_folder(text_model))
        if on_hub:
            text_model = download_hub_model(model_args, training_args)
        trained_folder = is_pmner_folder(text_model)
        if on_hub:
            check_untrained_evaluation(model_args, training_args, trained_folder)
        check_paths(model_args, data_args, training_args, text_model)
    except (ArgumentsError, ImportError) as error:
        print(f"train_pmner.py: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    try:
        run(model_args, data_args, training_args, text_model, trained_folder, argv)
    except (ArgumentsError, PushError, ContextFileError, TwitterMNERFormatError) as error:
        print(f"train_pmner.py: error: {one_line(error)}", file=sys.stderr)
        sys.exit(1 if isinstance(error, PushError) else 2)
    except KeyboardInterrupt:
        if training_args.process_index == 0:
            set_aside_broken(training_args.output_dir)  # a checkpoint cut short while saving is not resumed from
            print(  # on a line of its own: a progress bar may be mid-line
                f"\ntrain_pmner.py: interrupted; run the same command again to resume from the last checkpoint in "
                f"{training_args.output_dir}", file=sys.stderr,
            )
        sys.exit(130)
    except (OSError, RuntimeError) as error:
        cause = out_of_space(error)
        if cause is None:
            raise
        set_aside = set_aside_broken(training_args.output_dir) if training_args.process_index == 0 else []
        moved = f"; the half-written {', '.join(set_aside)} set aside" if set_aside else ""
        where = f" writing {cause.filename}" if getattr(cause, "filename", None) else ""
        print(f"\ntrain_pmner.py: error: no space left{where} ({one_line(cause)}){moved}", file=sys.stderr)
        sys.exit(1)


def download_hub_model(model_args, training_args) -> str:
    """--model_name_or_path, a Hub repository: its snapshot at --model_revision, downloaded (into --cache_dir, with
    --token) by the main process first; the other processes then read it from the cache."""
    name = model_args.text_model_name_or_path
    try:
        with training_args.main_process_first(desc="model download"):
            return download_text_model(name, **hub_kwargs(model_args))
    except (OSError, ValueError, *hub_transport_errors()) as error:  # the Hub's answers are OSErrors
        revision = f" (revision {model_args.model_revision!r})" if model_args.model_revision != "main" else ""
        raise ArgumentsError(
            f"--text_model_name_or_path {name!r}{revision} is neither a local folder nor a Hub model repository "
            f"this run can download: {one_line(error)}"
        ) from error


# how a failed write reads where no errno comes with it (torch's archive writer, C++ streams)
WRITE_FAILURES = ("No space left", "File too large", "file write failed", "iostream error", "unexpected pos")


def out_of_space(error: BaseException) -> BaseException | None:
    """The error of a full disk or a file-size limit in `error`'s chain, as the OS (ENOSPC, EFBIG, EDQUOT) or
    torch's writer reports it; `None` for any other error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return error
        text = str(error)
        if any(marker in text for marker in WRITE_FAILURES):
            return error
        error = error.__cause__ or error.__context__
    return None


def one_line(error: Exception) -> str:
    """An error's message on one line (a multi-line message's lines joined)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def run(model_args, data_args, training_args, text_model: str, trained_folder: bool, argv: list[str]):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    # This script's own progress (data, epochs, F1) is always shown on the main process.
    for name in (__name__, "training_pmner"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training arguments: {training_args}")
    logger.info(
        f"{training_args.world_size} process(es) ({training_args.parallel_mode.value}), device {training_args.device}"
    )

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train and not training_args.resume_from_checkpoint:
        last_checkpoint = newest_intact_checkpoint(training_args.output_dir, warn=training_args.process_index == 0)
        if last_checkpoint is not None:
            logger.info(f"Checkpoint found at {last_checkpoint}: resuming from it (pass another --output_dir to start over).")
    set_seed(training_args.seed)

    # 1. Data: the CoNLL text (or a Hub dataset) and, where there is an image dir, the image of each tweet.
    raw, hub_dataset = load_raw_data(data_args, model_args)
    use_visual = not data_args.text_only and (
        data_args.image_dir is not None or hub_dataset is not None or data_args.features_dataset is not None
    )
    if use_visual and not data_args.features_dataset and "image" not in raw["train"].column_names:
        raise ArgumentsError(f"--dataset_name {data_args.dataset_name!r} has no image column; pass --text_only")
    if not use_visual:
        reason = "--text_only was given" if data_args.text_only else "no --image_dir was given"
        logger.warning(f"Training WITHOUT images ({reason}): the model is text-only (use_visual=False).")
    bio_names = raw["train"].features["ner_tags"].feature.names
    if data_args.retrieval_context > len(raw["train"]):
        raise ArgumentsError(
            f"--retrieval_context {data_args.retrieval_context} asks for more neighbours than the {len(raw['train'])} "
            "training tweets"
        )

    # 2. Model and processor: a fresh P-MNER on a pretrained masked LM, or a trained P-MNER folder (to evaluate it,
    #    or to train it further) with its own processor. Neither may silently become another kind of model.
    model, processor = build_model_and_processor(
        model_args, training_args.explicit_arguments, text_model, trained_folder, use_visual, entity_types_of(bio_names)
    )
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    # Auxiliary context (beyond the paper): retrieved training tweets, or a context column of the data.
    with training_args.main_process_first(desc="auxiliary context"):  # one process writes the cached columns
        retrieval_index = prepare_context(
            raw, data_args, processor, text_model, trained_folder, training_args.device,
            model_args.text_model_name_or_path,
        )
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    if training_args.do_train and isinstance(checkpoint, str) and checkpoint.lower() not in ("true", "false"):
        check_same_model(f"checkpoint {checkpoint}", read_config(checkpoint), model.config.to_dict())
        if use_visual:
            check_same_features(checkpoint, image_processor)
        check_same_context(checkpoint, processor.context_source)
        check_same_head_learning_rate(checkpoint, training_args)
    random_frr = frr_weights_are_random(image_processor) if use_visual else []
    if training_args.push_to_hub and random_frr and not training_args.hub_allow_random_frr_weights:
        raise ArgumentsError(
            f"--push_to_hub would publish a visual model with random FRR weights ({', '.join(random_frr)}): pass "
            "pretrained weights, or --hub_allow_random_frr_weights to publish it anyway"
        )
    # A push that cannot work fails before any feature extraction or training: credentials checked, repository
    # created (private as --hub_private_repo says).
    repo_id = None
    if training_args.push_to_hub and training_args.process_index == 0:
        repo_id = prepare_hub_repo(training_args, training_args.output_dir)
        logger.info(f"Will push to the Hub repository {repo_id} ({training_args.hub_strategy} strategy)")
    if training_args.process_index == 0 and os.path.isdir(training_args.output_dir):
        for name in RESULT_FILES:
            if os.path.isfile(os.path.join(training_args.output_dir, name)):
                os.remove(os.path.join(training_args.output_dir, name))  # this run writes its own
        if training_args.do_train:
            # an earlier run's retrieval index (training tweets with gold entities) must not be saved or pushed
            # beside a model trained without it, nor mix with another encoder's files: this run saves its own
            for name in (INDEX_WEIGHTS, INDEX_RECORD):
                if os.path.isfile(os.path.join(training_args.output_dir, name)):
                    os.remove(os.path.join(training_args.output_dir, name))
            if os.path.isdir(os.path.join(training_args.output_dir, ENCODER_FOLDER)):
                shutil.rmtree(os.path.join(training_args.output_dir, ENCODER_FOLDER))
    missing_types = sorted({name.split("-", 1)[1] for name in bio_names if name != "O"} - set(model.config.entity_types))
    if missing_types:
        raise ArgumentsError(
            f"the data has the entity types {missing_types} that the model {text_model} does not tag "
            f"(its types: {model.config.entity_types}; see --other_as_misc)"
        )

    # 3. Visual features, extracted once and cached, before training; what they hold goes to all_results.json.
    visual_stats = {}
    if use_visual:
        cache_dir = data_args.feature_cache_dir or os.path.join(training_args.output_dir, "frr_cache")
        if data_args.features_dataset:  # features extracted elsewhere, checked against this run's FRR; no image read
            try:
                raw = attach_features_dataset(
                    raw, data_args.features_dataset, image_processor, model.config, cache_dir=model_args.cache_dir,
                    token=model_args.token, main_process_first=training_args.main_process_first,
                )
            except FeaturesDatasetError as error:
                raise ArgumentsError(str(error)) from error
            cache_dir = data_args.features_dataset
        # Every process takes part: the images are split between processes, each writes its share of the cache.
        for split in raw:
            if not data_args.features_dataset:
                raw[split] = image_processor.extract_dataset_features(
                    raw[split],
                    cache_dir=cache_dir,
                    device=training_args.device,
                    cache_dtype=data_args.feature_cache_dtype,
                    add_num_detections=True,  # for the visual statistics; dropped by the encoding
                )
            stats = visual_statistics(
                raw[split], image_processor.max_objects, image_processor.add_whole_image, image_processor.grid_size
            )
            visual_stats.update({f"visual_{split}_{key}": value for key, value in stats.items()})
        logger.info(f"FRR features of {sum(len(raw[split]) for split in raw)} tweets ready in {cache_dir}: {visual_stats}")
        if image_processor.detector is not None and "train" in raw:  # no detector (a grid among them): nothing detected
            train_stats = {key[len("visual_train_") :]: value for key, value in visual_stats.items() if key.startswith("visual_train_")}
            message = no_object_message(train_stats, image_processor.score_threshold)
            if message and model_args.require_objects:
                raise ArgumentsError(f"--require_objects: {message}")
            if message and training_args.process_index == 0:
                print(f"train_pmner.py: warning: {message}", file=sys.stderr)

    # 4. Tokenise with the prompt template; labels aligned to the first sub-word of each word. Long tweets become
    #    overlapping windows, cloze mode one row per word; the mapping columns lead predictions back to words.
    def encode(batch, indices):
        tags = [[bio_names[tag] for tag in sentence] for sentence in batch["ner_tags"]]
        visual = {}
        if use_visual:
            visual = {"visual_features": batch["visual_features"], "visual_mask": batch["visual_mask"]}
        # unpadded rows: the collator pads each training batch to its own longest
        context = batch["context"] if "context" in batch else None
        encoding = dict(
            processor(
                batch["tokens"], labels=tags, context=context, return_tensors=None, padding=False,
                return_mapping=True, **visual,
            )
        )
        encoding["sample_mapping"] = [indices[sample] for sample in encoding["sample_mapping"]]
        if not use_visual:
            del encoding["visual_features"], encoding["visual_mask"]
        return encoding

    encoded = {}
    with training_args.main_process_first(desc="tokenisation"):
        for split in raw:
            encoded[split] = raw[split].map(
                encode,
                batched=True,
                with_indices=True,
                remove_columns=raw[split].column_names,
                new_fingerprint=encoding_fingerprint(raw[split], processor, use_visual),
                num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Encoding {split} ({processor.prompt_mode} prompts)",
            )
    logger.info(
        "Encoded "
        + ", ".join(f"{split}: {len(raw[split])} tweets -> {len(encoded[split])} sequences" for split in raw)
    )

    # 5. Metrics: entity-level micro P/R/F1 (seqeval default mode) on whole tweets, every word scored.
    metric = load_seqeval_metric()

    def word_predictions(split, predicted_ids):
        """Per-tweet BIO tags from per-sequence predicted ids (windows and cloze queries merged)."""
        rows = encoded[split]
        width = predicted_ids.shape[1]
        mapping = {
            "sample_mapping": rows["sample_mapping"],
            "prediction_word_index": [row + [-1] * (width - len(row)) for row in rows["prediction_word_index"]],
            "num_words": rows["num_words"],
        }
        tags = processor.post_process_token_classification(predicted_ids, mapping, output_scheme="BIO")
        return tags + [["O"] * len(words) for words in raw[split]["tokens"][len(tags) :]]

    def references_of(split):
        return [[bio_names[tag] for tag in sentence] for sentence in raw[split]["ner_tags"]]

    def make_compute_metrics(split):
        references = references_of(split)

        def compute_metrics(eval_prediction):
            predictions = word_predictions(split, eval_prediction.predictions)
            scores = metric.compute(predictions=predictions, references=references)
            flat = {
                "precision": scores["overall_precision"],
                "recall": scores["overall_recall"],
                "f1": scores["overall_f1"],
                "accuracy": scores["overall_accuracy"],
            }
            for entity, values in scores.items():
                if isinstance(values, dict):
                    flat[f"{entity}_f1"] = values["f1"]
            return flat

        return compute_metrics

    def preprocess_logits(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)  # (batch, length): keeps evaluation memory small

    training_args.push_to_hub = False  # pushes are this script's (HubStrategyCallback, then the finished folder)
    callbacks = [EpochTimerCallback()]
    if repo_id is not None:
        callbacks.append(HubStrategyCallback(training_args, repo_id))
    trainer = PMNERTrainer(  # the Trainer, with --head_learning_rate for the layers P-MNER adds
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded["validation"],
        processing_class=processor,
        data_collator=PMNERDataCollator(pad_token_id=tokenizer.pad_token_id or 0),
        compute_metrics=make_compute_metrics("validation"),
        preprocess_logits_for_metrics=preprocess_logits,
        callbacks=callbacks,
    )

    # 6. Train, selecting the epoch with the best validation F1.
    extras = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        if retrieval_index is not None and trainer.is_world_process_zero():
            retrieval_index.save_pretrained(training_args.output_dir)  # the pipeline retrieves from it
        metrics = dict(train_result.metrics, train_samples=len(raw["train"]))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        if trainer.state.best_model_checkpoint:  # published: relative to the output folder, no local path
            trainer.state.best_model_checkpoint = os.path.relpath(trainer.state.best_model_checkpoint, training_args.output_dir)
        trainer.save_state()
        if trainer.is_world_process_zero():
            add_pipeline_to_folder(training_args.output_dir)  # pipeline(model=folder, trust_remote_code=True)
        extras["best_model_checkpoint"] = trainer.state.best_model_checkpoint
        best_epochs = [
            entry["epoch"] for entry in trainer.state.log_history if entry.get("eval_f1") == trainer.state.best_metric
        ]
        extras["best_epoch"] = best_epochs[0] if best_epochs else None

    # 7. Validation metrics of the chosen model; then the test split, once.
    if training_args.do_eval:
        metrics = dict(trainer.evaluate(), eval_samples=len(raw["validation"]))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    test_output = None
    if training_args.do_predict:
        trainer.compute_metrics = make_compute_metrics("test")
        test_output = trainer.predict(encoded["test"], metric_key_prefix="predict")
        metrics = dict(test_output.metrics, predict_samples=len(raw["test"]))
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)

    if not trainer.is_world_process_zero():
        return
    results = update_all_results(training_args.output_dir, {**extras, **visual_stats})
    report = None
    if test_output is not None:
        predictions = word_predictions("test", test_output.predictions)
        report = write_test_outputs(training_args.output_dir, raw["test"], references_of("test"), predictions)
    write_model_card(
        training_args.output_dir,
        results=results,
        report=report,
        model_args=model_args,
        data_args=data_args,
        training_args=training_args,
        num_examples={split: len(raw[split]) for split in raw},
        frr_settings=saved_image_processor_settings(training_args.output_dir, image_processor),
        use_visual=use_visual,
        hub_dataset=hub_dataset,
        trained_here=training_args.do_train,
        argv=argv,
        model_settings={
            "fusion": model.config.fusion,
            "head": model.config.head,
            "tag_scheme": model.config.tag_scheme,
            "prompt_mode": processor.prompt_mode,
            "context_source": processor.context_source,
        },
    )
    summary = [f"validation F1 {results['eval_f1']:.4f}" if "eval_f1" in results else "validation not evaluated"]
    summary.append(f"test F1 {results['predict_f1']:.4f}" if "predict_f1" in results else "test not evaluated")
    logger.info(" | ".join(summary) + f" | wrote {os.path.abspath(training_args.output_dir)}")
    if repo_id is not None:
        push_output_folder(training_args, repo_id)


def saved_image_processor_settings(output_dir: str, image_processor) -> dict:
    """The image processor's settings as saved in `output_dir` (with its FRR weights record), or as in memory when
    this run saved no processor (an evaluation of a trained folder, whose processor was loaded with its record)."""
    path = os.path.join(output_dir, "processor_config.json")
    if os.path.isfile(path):
        with open(path) as handle:
            saved = json.load(handle).get("image_processor")
        if isinstance(saved, dict):
            return saved
    return image_processor.to_dict()


def encoding_fingerprint(split, processor, use_visual: bool) -> str:
    """The `datasets` fingerprint of an encoded split, from what the encoding depends on: the split, the processor's
    settings and its tokenizer. (Left to `datasets`, it would hash the `encode` closure, and with it the built FRR
    networks: seconds per split for nothing.)"""
    from datasets.fingerprint import Hasher

    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return Hasher.hash(
        [
            split._fingerprint,
            json.dumps(processor.to_dict(), sort_keys=True, default=str),
            backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
            type(tokenizer).__name__,
            use_visual,
            ENCODING_VERSION,
        ]
    )


def update_all_results(output_dir: str, extras: dict) -> dict:
    """Adds `extras` (best epoch, visual statistics) to the `all_results.json` that `Trainer.save_metrics` wrote."""
    path = os.path.join(output_dir, "all_results.json")
    results = {}
    if os.path.isfile(path):
        with open(path) as handle:
            results = json.load(handle)
    results.update(extras)
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=4, sort_keys=True, default=str)
    return results


def write_test_outputs(output_dir: str, test_split, references, predictions) -> str:
    """The per-type report (`predict_report.txt`) and the test predictions as CoNLL (token, gold, predicted)."""
    report = ner_classification_report(predictions, references)
    with open(os.path.join(output_dir, "predict_report.txt"), "w") as handle:
        handle.write(report)
    with open(os.path.join(output_dir, "test_predictions.conll"), "w") as handle:
        for image_id, tokens, gold, predicted in zip(test_split["image_id"], test_split["tokens"], references, predictions):
            handle.write(f"IMGID:{image_id}\n")
            for token, gold_tag, predicted_tag in zip(tokens, gold, predicted):
                handle.write(f"{token}\t{gold_tag}\t{predicted_tag}\n")
            handle.write("\n")
    return report


if __name__ == "__main__":
    main()
