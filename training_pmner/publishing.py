"""What a finished `train_pmner.py` run publishes: the model card, and the upload to the Hub (repository created
before training, checkpoints pushed as `hub_strategy` says, the finished folder uploaded at the end).

A model repository holds the model, the processor with its FRR weights, the remote code, the card, the results
files and the per-type report; `test_predictions.conll` (the gold test tweets) and `training_args.bin` (a pickle)
only when asked for.
"""

import logging
import os
import re

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_token
from transformers import TrainerCallback

from processing_pmner.text_retrieval_context import ENCODER_FOLDER, INDEX_RECORD

from .arguments import ARGUMENT_FILE_SUFFIXES
from .data import NO_OBJECT_SHARE_LIMIT, hub_id_of_text_model


logger = logging.getLogger(__name__)

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD_TEMPLATE = os.path.join(PROJECT, "model_card.md")
TEST_PREDICTIONS = "test_predictions.conll"
TRAINING_ARGS = "training_args.bin"
# What a model repository holds: weights, configs, tokenizer files, remote code, results, the per-type report.
PUBLISHED_SUFFIXES = (".safetensors", ".json", ".py", ".txt", ".model")
EXCLUDED_FILES = ("experiment.json",)  # a benchmark runner's record, not the model's
DATASET_TITLES = {"twitter2015": "Twitter-2015", "twitter2017": "Twitter-2017"}
# The card's dataset when the data did not come from a Hub dataset repository: the Twitter MNER builder's name
# (`training_pmner/twitter_mner.py`), with the benchmark as its config.
CANONICAL_DATASET = "twitter_mner"


def card_dataset(data_args, hub_dataset: str | None) -> tuple[str, str | None]:
    """`(dataset id, config)` of the card's `model-index` and `datasets:`: the Hub dataset the data came from, with
    its config; else the builder's canonical name with the benchmark as config (`custom` for CoNLL files given by
    `--train_file`)."""
    if hub_dataset:
        return hub_dataset, data_args.dataset_config_name
    if getattr(data_args, "train_file", None) or data_args.dataset_name not in DATASET_TITLES:
        return CANONICAL_DATASET, "custom"
    return CANONICAL_DATASET, data_args.dataset_name


def card_dataset_title(data_args) -> str:
    """The dataset as the card names it: the benchmark, or the CoNLL files given by `--train_file`."""
    title = DATASET_TITLES.get(data_args.dataset_config_name or data_args.dataset_name, data_args.dataset_name)
    if getattr(data_args, "train_file", None):
        return f"CoNLL files (`{os.path.basename(data_args.train_file)}`, ...) with {title}'s tags"
    return title


class PushError(RuntimeError):
    """The Hub refused or could not be reached; the message says what to do. Local files are never touched."""


# ----------------------------------------------------------------------------------------------------------------------
# Hub repository
# ----------------------------------------------------------------------------------------------------------------------


def frr_weights_are_random(image_processor) -> list[str]:
    """The FRR settings whose weights are random (`random` or `random:SEED`), e.g. `['backbone_weights']`."""
    settings = image_processor.to_dict()
    names = ["backbone_weights"] + (["detector_weights"] if settings.get("detector") else [])
    return [name for name in names if str(settings.get(name)).lower().startswith("random")]


def prepare_hub_repo(training_args, output_dir: str) -> str:
    """Checks the credentials and creates the model repository (private as `hub_private_repo` says) before any
    training, so a push that cannot work fails first. Returns the repository id."""
    token = training_args.hub_token or get_token()
    if not token:
        raise PushError(
            "--push_to_hub needs a Hugging Face token with write access: run `hf auth login`, set HF_TOKEN, or pass "
            "--hub_token"
        )
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    api = HfApi(token=token)
    try:
        return api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True).repo_id
    except HfHubHTTPError as error:
        raise PushError(f"--push_to_hub: the Hub refused to create {repo_id!r}: {error}") from error
    except Exception as error:  # the HTTP stack's connection errors (httpx/httpcore) share no base class with OSError
        raise PushError(
            f"--push_to_hub: could not reach the Hub at {api.endpoint} to create {repo_id!r}: "
            f"{type(error).__name__}: {error}"
        ) from error


def context_summary(source: dict | None) -> str:
    """The card's line on auxiliary context: none, or what kind the model was trained with (and so expects)."""
    if not source:
        return "none: trained on the tweet alone"
    if source.get("kind") == "retrieval":
        return (
            f"retrieval: {source.get('description')}; the pipeline retrieves from the index saved with the model "
            f"(`retrieval_index.json`, `retrieval_encoder/`)"
        )
    return (
        f"{source.get('description')}: give the same kind of text as `context` at inference "
        "(`ner(text, context=...)`, a `context` field in the CLI's JSONL)"
    )


def publishable_files(output_dir: str, training_args) -> list[str]:
    """The top-level files of the output folder that a model repository holds (never checkpoints, caches or logs;
    the test predictions and the pickled training arguments only when asked for)."""
    excluded = set(EXCLUDED_FILES)
    if not training_args.hub_include_test_predictions:
        excluded.add(TEST_PREDICTIONS)
    if not training_args.hub_include_training_args:
        excluded.add(TRAINING_ARGS)
    names = sorted(
        name
        for name in os.listdir(output_dir)
        if os.path.isfile(os.path.join(output_dir, name))
        and name not in excluded
        and (name.endswith(PUBLISHED_SUFFIXES) or name in (TEST_PREDICTIONS, TRAINING_ARGS, "README.md"))
        and not name.startswith((".", "_"))
    )
    encoder = os.path.join(output_dir, ENCODER_FOLDER)  # the encoder of a saved retrieval index
    if INDEX_RECORD in names and os.path.isdir(encoder):
        names += sorted(
            f"{ENCODER_FOLDER}/{name}"
            for name in os.listdir(encoder)
            if os.path.isfile(os.path.join(encoder, name)) and name.endswith(PUBLISHED_SUFFIXES)
        )
    return names


def upload(training_args, repo_id: str, folder: str, files: list[str], message: str, path_in_repo: str | None = None):
    """Uploads `files` of `folder` in one commit; a refusal or a network failure becomes a `PushError`."""
    api = HfApi(token=training_args.hub_token or get_token())
    try:
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            allow_patterns=files,
            commit_message=message,
            revision=training_args.hub_revision,
        )
    except HfHubHTTPError as error:
        raise PushError(f"Pushing {folder} to {repo_id!r} failed: {error}") from error
    except Exception as error:  # connection errors of the HTTP stack; the local files were only read
        raise PushError(
            f"Pushing {folder} to {repo_id!r}: could not reach the Hub at {api.endpoint}: {type(error).__name__}: {error}"
        ) from error


def push_output_folder(training_args, repo_id: str) -> list[str]:
    """Uploads the finished output folder (see `publishable_files`); returns the files uploaded."""
    output_dir = training_args.output_dir
    files = publishable_files(output_dir, training_args)
    if training_args.hub_include_test_predictions:
        logger.warning(
            f"Uploading {TEST_PREDICTIONS}: it holds the gold test tweets; make sure the Twitter data's terms allow "
            "redistributing them."
        )
    upload(training_args, repo_id, output_dir, files, "P-MNER trained with train_pmner.py")
    logger.info(f"Pushed {len(files)} files of {output_dir} to {repo_id}: {', '.join(files)}")
    return files


class HubStrategyCallback(TrainerCallback):
    """Pushes during training as `hub_strategy` documents it: `every_save` the model of each checkpoint to the
    repository root, `checkpoint` that and the latest checkpoint to `last-checkpoint/` (to resume from), and
    `all_checkpoints` each checkpoint to a folder of its own name. `end` (default) pushes nothing here; the finished
    folder is uploaded once at the end either way. Uploads run in the main process and block training while they
    run."""

    MODEL_FILES_EXCLUDED = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", TRAINING_ARGS)

    def __init__(self, training_args, repo_id: str):
        self.training_args = training_args
        self.repo_id = repo_id

    def on_save(self, args, state, control, **kwargs):
        strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
        if strategy == "end" or not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):
            return
        files = [
            name
            for name in os.listdir(checkpoint)
            if os.path.isfile(os.path.join(checkpoint, name))
            and not name.startswith("rng_state")
            and name not in self.MODEL_FILES_EXCLUDED
        ]
        message = f"Training in progress, step {state.global_step}"
        upload(self.training_args, self.repo_id, checkpoint, files, message)
        if strategy in ("checkpoint", "all_checkpoints"):
            # the whole checkpoint, to resume from (optimizer, scheduler and RNG states are torch pickles: readers must
            # trust the repository); training_args.bin only when asked for, as for the model files
            every = sorted(
                name
                for name in os.listdir(checkpoint)
                if os.path.isfile(os.path.join(checkpoint, name))
                and (name != TRAINING_ARGS or self.training_args.hub_include_training_args)
            )
            target = "last-checkpoint" if strategy == "checkpoint" else os.path.basename(checkpoint)
            upload(self.training_args, self.repo_id, checkpoint, every, message + ", checkpoint", path_in_repo=target)


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------

SECRET_ARGUMENTS = ("hub_token", "token")


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line with the values of secret arguments (`--hub_token`, `--token`) replaced: the card is published."""
    flags = {f"--{name}" for name in SECRET_ARGUMENTS} | {f"--{name.replace('_', '-')}" for name in SECRET_ARGUMENTS}
    redacted, hide = [], False
    for item in argv:
        name = item.split("=", 1)[0]
        if hide:
            redacted.append("<redacted>")
        elif name in flags and "=" in item:
            redacted.append(f"{name}=<redacted>")
        else:
            redacted.append(item)
        hide = item in flags
    return redacted


def redacted_file_text(text: str) -> str:
    """An argument file's text with the values of secret keys replaced (YAML `key: value`, JSON `"key": "value"`)."""
    for name in SECRET_ARGUMENTS:
        text = re.sub(rf'(^\s*{name}\s*:\s*).*$', r"\1<redacted>", text, flags=re.MULTILINE)
        text = re.sub(rf'("{name}"\s*:\s*)"[^"]*"', r'\1"<redacted>"', text)
    return text


def frr_weights_summary(settings: dict, use_visual: bool) -> str:
    """The FRR networks and their weights' origin and checksum, from the image processor's saved settings (its
    `frr_weights` record: file, origin, sha256 of each network's tensors)."""
    if not use_visual:
        return "none (text-only model)"
    record = settings.get("frr_weights") or {}
    parts = []
    for role in ("detector", "backbone"):
        name = settings.get(role)
        if name is None:
            grid = settings.get("grid_size")
            whole = f"the whole image as a {grid} x {grid} grid of regions" if grid else "the whole image is the only object"
            parts.append(f"{role}: none ({whole})")
            continue
        saved = record.get(role) or {}
        origin = saved.get("origin") or settings.get(f"{role}_weights")
        text = f"{role}: `{name}`, weights `{origin}`"
        if saved.get("file"):
            text += f" in `{saved['file']}` ({record.get('dtype', 'float32')})"
        if saved.get("sha256"):
            text += f", sha256 `{saved['sha256']}`"
        parts.append(text)
    return "; ".join(parts)


def detections_summary(results: dict, use_visual: bool, detector, grid_size=None) -> str:
    """The training split's detections as the card states them, with the warning `train_pmner.py` gave."""
    if not use_visual:
        return "n/a (text-only model)"
    if grid_size:
        return f"no detector: the whole image as a {grid_size} x {grid_size} grid ({grid_size * grid_size} regions)"
    if detector is None:
        return "no detector: the whole image is the only object"
    share_with = results.get("visual_train_share_with_object_above_threshold")
    if share_with is None:
        return "not measured in this run"
    text = (
        f"{share_with:.1%} of the {results.get('visual_train_images_given', 0)} training images have an object above the "
        f"threshold; {results.get('visual_train_whole_image_fallbacks', 0)} use the whole-image fallback"
    )
    if 1.0 - share_with >= NO_OBJECT_SHARE_LIMIT:
        text += (
            f" (**warning**: {1.0 - share_with:.1%} have no detected object, at least {NO_OBJECT_SHARE_LIMIT:.0%}: "
            "for those the visual input is the whole image or nothing)"
        )
    return text


def portable_path(value: str, output_dir: str) -> tuple[str, bool]:
    """`(text, changed)`: a path inside the output folder relative to it, any other absolute or existing path by its
    base name, anything else as it is. What the card publishes names no folder of the trainer's machine."""
    if not value or value.startswith("-") or "://" in value:
        return value, False
    looks_like_path = os.path.isabs(value) or (os.sep in value and os.path.exists(value))
    if not looks_like_path:
        return value, False
    absolute, root = os.path.realpath(value), os.path.realpath(output_dir)
    if absolute == root or absolute.startswith(root + os.sep):
        return os.path.relpath(absolute, root), True
    return os.path.basename(absolute.rstrip(os.sep)) or value, True


def portable_argv(argv: list[str], output_dir: str) -> tuple[list[str], bool]:
    """The command line with every path made portable (`portable_path`), `--flag=value` forms included."""
    result, changed = [], False
    for item in argv:
        flag, sep, value = item.partition("=") if item.startswith("--") else ("", "", item)
        text, moved = portable_path(value, output_dir)
        result.append(f"{flag}{sep}{text}")
        changed |= moved
    return result, changed


def portable_text(text: str, output_dir: str) -> str:
    """An argument file's text with every absolute path made portable."""
    return re.sub(r"(?<![\w:])/[^\s'\",]+", lambda match: portable_path(match.group(0), output_dir)[0], text)


def learning_rates(training_args) -> str:
    """The learning rate, with the added layers' own when --head_learning_rate gave them one."""
    head = getattr(training_args, "head_learning_rate", None)
    if head is None:
        return str(training_args.learning_rate)
    return f"{training_args.learning_rate} (text encoder), {head} (added layers: fusion, visual projection, head)"


def write_model_card(
    output_dir: str,
    results: dict,
    report: str | None,
    model_args,
    data_args,
    training_args,
    num_examples: dict,
    frr_settings: dict,
    use_visual: bool,
    hub_dataset: str | None,
    trained_here: bool,
    argv: list[str],
    model_settings: dict,
):
    """Fills the repository's `model_card.md` template with this run's numbers and a `model-index` (test scores when
    the run predicted test, else validation scores)."""
    dataset_title = card_dataset_title(data_args)
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    split, prefix = ("test", "predict") if "predict_f1" in results else ("validation", "eval")
    dataset_id, dataset_config = card_dataset(data_args, hub_dataset)
    eval_results = [
        EvalResult(
            task_type="token-classification",
            task_name="Named Entity Recognition",
            dataset_type=dataset_id,
            dataset_name=dataset_title,
            dataset_config=dataset_config,
            dataset_split=split,
            metric_type=name,
            metric_value=round(results[f"{prefix}_{name}"], 4),
        )
        for name in ("precision", "recall", "f1")
        if f"{prefix}_{name}" in results
    ]
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="token-classification",
        tags=["multimodal-ner", "named-entity-recognition", "pmner", "custom_code"],
        datasets=[dataset_id],
        base_model=hub_id_of_text_model(model_args.text_model_name_or_path) if trained_here else None,
        model_name=repo_id,
        eval_results=eval_results or None,
    )

    def number(key):
        return f"{results[key] * 100:.2f}" if key in results else "n/a"

    if trained_here:
        provenance = "This model was trained with `train_pmner.py` of the P-MNER package, by the command below."
    else:
        provenance = (
            f"This card reports an evaluation of the trained P-MNER model `{portable_path(model_args.text_model_name_or_path, output_dir)[0]}` by "
            "`train_pmner.py`: the model was **not trained in this run** (see that model's own card for how it was "
            "trained); the training rows below describe this evaluation's settings."
        )
    shown_argv, moved = portable_argv(redacted_argv(argv), output_dir)
    command = " ".join(["train_pmner.py", *shown_argv])
    if moved:
        command += "\n# paths: inside the output folder relative to it, any other by its base name"
    file_text = ""
    argument_file = argv[0] if argv and argv[0].endswith(ARGUMENT_FILE_SUFFIXES) else None
    if argument_file and os.path.isfile(argument_file):
        with open(argument_file) as handle:
            text = portable_text(redacted_file_text(handle.read().strip()), output_dir)
        file_text = f"\nwith `{portable_path(argument_file, output_dir)[0]}`:\n\n```yaml\n{text}\n```\n"
    text_model = hub_id_of_text_model(model_args.text_model_name_or_path) or portable_path(
        model_args.text_model_name_or_path, output_dir
    )[0]
    card = ModelCard.from_template(
        card_data,
        template_path=CARD_TEMPLATE,
        model_name=repo_id,
        repo_id=repo_id,
        provenance=provenance,
        dataset_name=dataset_title + (f" (`{hub_dataset}`)" if hub_dataset else ""),
        num_train=num_examples.get("train"),
        num_eval=num_examples.get("validation"),
        num_test=num_examples.get("test"),
        text_model=text_model,
        detections=detections_summary(results, use_visual, frr_settings.get("detector"), frr_settings.get("grid_size")),
        visual_input="FRR object features" if use_visual else "none (text only)",
        frr_weights=frr_weights_summary(frr_settings, use_visual),
        fusion=model_settings["fusion"],
        head=model_settings["head"],
        tag_scheme=model_settings["tag_scheme"],
        prompt_mode=model_settings["prompt_mode"],
        context=context_summary(model_settings.get("context_source")),
        epochs=training_args.num_train_epochs if trained_here else "n/a (not trained in this run)",
        batch_size=training_args.per_device_train_batch_size * max(1, training_args.world_size),
        learning_rate=learning_rates(training_args),
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
        test_report=(report or "test not evaluated in this run (--do_predict)").strip(),
        command=command,
        argument_file=file_text,
        other_note=(
            "Twitter-2015's `OTHER` type is reported as `MISC`."
            if data_args.other_as_misc
            else "Twitter-2015's `OTHER` type is kept as `OTHER`."
        ),
    )
    card.save(os.path.join(output_dir, "README.md"))
