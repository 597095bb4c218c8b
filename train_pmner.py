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

import json
import logging
import os
import shutil
import sys

import datasets
import transformers
from transformers import AutoConfig, AutoTokenizer, set_seed

from modeling_pmner import PMNERConfig, PMNERForTokenClassification
from processing_pmner import PMNERImageProcessor, PMNERProcessor
from training_pmner.context_files import ContextFileError
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
    parse_arguments,
    set_file_defaults,
)
from training_pmner.argument_checks import check_arguments, check_untrained_evaluation
from training_pmner.callbacks import EpochTimerCallback
from training_pmner.checkpoints import set_aside_broken
from training_pmner.errors import one_line, out_of_space
from training_pmner.checks import (
    RESULT_FILES,
    check_data,
    check_entity_types,
    check_folder_processor,
    check_folder_switches,
    check_max_seq_length,
    check_paths,
    check_publishable_frr,
    check_resumable,
    check_same_model,
    newest_intact_checkpoint,
    none_if_none,
    read_config,
    settings_error,
)
from training_pmner.optimizer import PMNERTrainer
from training_pmner.context import prepare_context
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
    prepare_hub_repo,
    push_output_folder,
    write_model_card,
)


logger = logging.getLogger(__name__)

__all__ = [  # what tests and benchmarks import from this script
    "ArgumentsError", "DataArguments", "DataTrainingArguments", "ModelArguments", "OFFLINE_MINILM", "PMNERDataCollator", "PMNERTrainingArguments",
    "check_same_model", "main", "parse_arguments", "resolve_data_dir", "resolve_text_model", "set_file_defaults",
]

# Bump when `encode` changes what it writes, so that cached encodings of an older version are not reused.
ENCODING_VERSION = 1


def build_model_and_processor(model_args, explicit, text_model, trained_folder, use_visual, entity_types):
    """A fresh P-MNER on a pretrained masked LM with a new processor, or a trained P-MNER folder with its own.

    Everything cheap comes first and is checked (the text model's config and tokenizer, the P-MNER config, the
    processor and, for a visual run, the FRR networks with their weights), so that a bad setting stops the run
    with one line naming it before the text model's weights load or any image is read."""
    if trained_folder:
        saved = read_config(text_model)
        check_folder_switches(text_model, saved, model_args, explicit)
        try:
            processor = PMNERProcessor.from_pretrained(text_model)  # refuses tags other than config.json's
        except (OSError, ValueError) as error:
            raise settings_error(text_model, error) from error
        check_folder_processor(text_model, saved, processor, model_args, explicit, use_visual)
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
    check_max_seq_length(model_args, tokenizer, text_config)
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
    if not use_visual:
        reason = "--text_only was given" if data_args.text_only else "no --image_dir was given"
        logger.warning(f"Training WITHOUT images ({reason}): the model is text-only (use_visual=False).")
    check_data(raw, data_args, use_visual)
    bio_names = raw["train"].features["ner_tags"].feature.names

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
        check_resumable(checkpoint, model.config.to_dict(), processor, training_args, use_visual)
    check_publishable_frr(training_args, image_processor, use_visual)
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
    check_entity_types(bio_names, model.config.entity_types, text_model)

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
