"""Arguments of `train_pmner.py`: dataclasses in the shape of transformers' `run_ner.py`, the parser, and argument
files. Their checks are `argument_checks`."""

import copy
import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from .errors import ArgumentsError


@dataclass
class ModelArguments:
    """Which text model to start from, and the P-MNER switches (Table 3 of the paper)."""

    _argument_group_name = "ModelArguments"

    text_model_name_or_path: str = field(
        default="bert-base-uncased",
        metadata={
            "aliases": ["--model_name_or_path"],
            "help": "Masked LM (Hub id or local folder) to build P-MNER on; 'offline-minilm': the MiniLM of the "
            "offline extra; or a trained P-MNER (a folder or Hub repository written by this script), to evaluate or "
            "train it further.",
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where models downloaded from the Hub are stored (default: the Hub cache)."}
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "Revision of a Hub --model_name_or_path: a branch, a tag or a commit id."},
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for a private or gated --model_name_or_path (default: the one `hf auth login` saved)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the modelling code that a --model_name_or_path repository ships (only for repositories you "
            "trust and have read)."
        },
    )
    fusion: str = field(default="tcfm", metadata={"help": "'tcfm' (the paper) or 'concat' (the T+V baseline)."})
    head: str = field(default="verbalizer", metadata={"help": "'verbalizer' (prompt head) or 'linear'."})
    tag_scheme: str = field(default="BIO", metadata={"help": "Tags the model predicts: 'BIO' or 'BIOES'."})
    prompt_mode: str = field(default="token", metadata={"help": "'token' (one pass per tweet) or 'cloze'."})
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Prompt template with {sentence}, {word}, {mask} (default: the paper's "
            "'{sentence} , the word of {word} is {mask} .' for the verbalizer head; the plain tweet, '{sentence}', "
            "for --head linear)."
        },
    )
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
        default="DEFAULT",
        metadata={
            "help": "Faster R-CNN weights: 'DEFAULT' (COCO; recorded by its full enum name), another weights name, "
            "a local .safetensors file, or 'random' / 'random:SEED' (explicitly random)."
        },
    )
    backbone_weights: str | None = field(
        default="DEFAULT", metadata={"help": "ResNet weights, as --detector_weights (DEFAULT: ImageNet)."}
    )
    detector_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Extra arguments of the torchvision detector builder, as a JSON object, e.g. "
            "'{\"box_score_thresh\": 0.0}' (torchvision drops boxes under its own 0.05 before --score_threshold)."
        },
    )
    score_threshold: float = field(default=0.95, metadata={"help": "FRR keeps detections scoring above this."})
    require_objects: bool = field(
        default=False,
        metadata={
            "help": "Refuse a visual run in which at least 5%% of the training images have no detected object "
            "(whole-image fallbacks apart); without it such a run warns."
        },
    )
    max_objects: int = field(default=5, metadata={"help": "FRR objects per image."})
    crop_size: int | None = field(
        default=None, metadata={"help": "Side of each object crop (default: the backbone weights' own, 224)."}
    )
    feature_layer: str = field(
        default="layer4",
        metadata={
            "help": "ResNet stage whose pooled output is the object feature: 'layer4' (2048-d for ResNet-152) or "
            "'layer3' (1024-d for ResNet-152, the paper's R^1024); the model's visual_feature_dim follows it."
        },
    )
    grid_size: int | None = field(
        default=None,
        metadata={
            "help": "Read the whole image as a G x G grid of regions pooled from one feature map (UMT's 7 x 7 "
            "grid), each cell one object; needs --detector none and --max_objects G*G."
        },
    )
    add_whole_image: bool = field(
        default=True,
        metadata={
            "help": "When fewer than --max_objects detections pass, add the whole image as one more object (false: "
            "the paper's FRR, objects only)."
        },
    )
    frr_weights_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the FRR weights are saved in with the model: float32, bfloat16 or float16."},
    )


@dataclass
class DataArguments:
    """What data to train and evaluate on."""

    _argument_group_name = "DataTrainingArguments"

    dataset_name: str = field(
        default="twitter2017",
        metadata={
            "help": "'twitter2015' or 'twitter2017' (CoNLL files, see --data_dir), or a Hub dataset repository "
            "made by push_twitter_mner_to_hub (with --dataset_config_name)."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Config of a Hub dataset repository: 'twitter2015' or 'twitter2017'."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with train.txt, valid.txt, test.txt (downloaded when omitted); 'auto': "
            "../shared/data/<dataset_name> beside the repository when it exists."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "A CoNLL file in the Twitter MNER format (IMGID:<id> line, token<TAB>tag lines, blank line between "
            "tweets) to train on, instead of --data_dir; with --validation_file and --test_file. The tags are those "
            "of --dataset_name (twitter2015: with OTHER)."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation tweets as --train_file (selects the epoch; --do_eval scores it)."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Test tweets as --train_file (--do_predict)."})
    image_dir: str | None = field(default=None, metadata={"help": "Folder with <IMGID>.jpg images."})
    text_only: bool = field(default=False, metadata={"help": "Train without images (use_visual=False)."})
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Where FRR features are cached (default: <output_dir>/frr_cache)."}
    )
    feature_cache_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the FRR features are cached in: float32, or float16 (half the disk; read as float32)."},
    )
    features_dataset: str | None = field(
        default=None,
        metadata={
            "help": "A features dataset (local folder or Hub dataset id) written by `python -m "
            "training_pmner.features_dataset export`: train on its FRR features instead of --image_dir. Its FRR "
            "settings and weights must be this run's."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenise the splits (datasets' map num_proc)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenise again instead of reading the cached encodings."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training tweets."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation tweets."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test tweets."})
    other_as_misc: bool = field(
        default=True, metadata={"help": "Rename Twitter-2015's OTHER to MISC (false: train and tag OTHER)."}
    )
    retrieval_context: int = field(
        default=0,
        metadata={
            "help": "Give every tweet its K nearest training tweets (with their gold entities marked) as auxiliary "
            "context; 0 (default): no retrieval. The index is saved with the model and used by the pipeline."
        },
    )
    retrieval_encoder: str | None = field(
        default=None,
        metadata={
            "help": "Sentence encoder of --retrieval_context (any transformers encoder; mean pooling). Default: "
            "the pretrained --text_model_name_or_path ('offline-minilm' accepted)."
        },
    )
    context_file: str | None = field(
        default=None,
        metadata={
            "help": "JSONL or Parquet file of auxiliary context per tweet (fields 'context' and 'id' or 'image_id'), "
            "e.g. captions or LLM-written knowledge made elsewhere; read into the dataset's 'context' column."
        },
    )
    context_description: str | None = field(
        default=None,
        metadata={"help": "What --context_file holds (for the model card), e.g. 'BLIP-2 image captions'."},
    )


@dataclass
class PMNERTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the defaults this task wants (evaluate and save every epoch, keep the epoch with the
    best validation F1) and what a push to the Hub may hold."""

    _argument_group_name = "TrainingArguments"

    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on validation."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the best validation epoch."})
    metric_for_best_model: str = field(default="f1", metadata={"help": "Validation metric that selects the model."})
    greater_is_better: bool = field(default=True, metadata={"help": "Higher metric_for_best_model is better."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best is never deleted)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of AdamW."})
    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the layers P-MNER adds to the text encoder (fusion, visual projection, "
            "prompt head or classifier); the pretrained text encoder trains at --learning_rate. Default: "
            "--learning_rate for all."
        },
    )
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "The paper's batch size is 8."})
    logging_steps: float = field(default=20, metadata={"help": "Log the loss every N steps."})
    hub_include_test_predictions: bool = field(
        default=False,
        metadata={
            "help": "Also upload test_predictions.conll (the gold test tweets: check the Twitter data's terms first)."
        },
    )
    hub_include_training_args: bool = field(
        default=False, metadata={"help": "Also upload training_args.bin (a pickle: readers must trust it)."}
    )
    hub_allow_random_frr_weights: bool = field(
        default=False,
        metadata={"help": "Allow pushing a visual model whose FRR detector or backbone weights are random."},
    )


ARGUMENT_FILE_SUFFIXES = (".json", ".yaml", ".yml")


DataTrainingArguments = DataArguments  # run_ner.py's name

# run_ner.py arguments that have no meaning for P-MNER, refused with the reason
REFUSED_RUN_NER_ARGUMENTS = {
    "task_name": "P-MNER only does named entity recognition",
    "text_column_name": "the words are always the 'tokens' column (the Twitter MNER format)",
    "label_column_name": "the tags are always the 'ner_tags' column (the Twitter MNER format)",
    "label_all_tokens": "P-MNER labels, and is scored on, the first sub-word of each word only",
    "return_entity_level_metrics": "the F1 of every entity type is always reported (eval_PER_f1, ...; "
    "predict_report.txt has the full report)",
    "pad_to_max_length": "each batch is padded to its own longest sequence (--max_seq_length caps the length)",
    "config_name": "the P-MNER config is built around --model_name_or_path's own config",
    "tokenizer_name": "the tokenizer is --model_name_or_path's own (the verbalizer's label words are its tokens)",
    "ignore_mismatched_sizes": "P-MNER builds its own head for the data's tags; the text model's weights must fit",
}


class OneLineErrorParser(HfArgumentParser):
    """argparse's own errors (a value that is not a number, an unknown choice) as one `ArgumentsError` naming the
    argument, instead of the usage text (a hundred lines) before it."""

    def error(self, message):
        raise ArgumentsError(message)


def build_parser() -> HfArgumentParser:
    return OneLineErrorParser(
        (ModelArguments, DataArguments, PMNERTrainingArguments),
        epilog="run_ner.py arguments that do not apply here and are refused: "
        + ", ".join(f"--{name}" for name in REFUSED_RUN_NER_ARGUMENTS),
    )


def refused_argument(item: str) -> str | None:
    """The reason a run_ner.py argument (`--label_all_tokens`, `--label-all-tokens=true`) is refused; `None` for any
    other."""
    name = item.split("=", 1)[0].lstrip("-").replace("-", "_")
    if item.startswith("--") and name in REFUSED_RUN_NER_ARGUMENTS:
        return f"--{name} is a run_ner.py argument that train_pmner.py does not take: {REFUSED_RUN_NER_ARGUMENTS[name]}"
    return None


def parse_arguments(argv: list[str] | None = None):
    """Command-line arguments, or a JSON / YAML file of them as the first argument followed by command-line
    arguments that override it (`train_pmner.py configs/paper-twitter2017.yaml --fusion concat`).

    Returns `(model_args, data_args, training_args)`; `training_args.explicit_arguments` is the set of argument names
    given on the command line or in the file (TrainingArguments turns `do_eval` on by itself when evaluating every
    epoch, so an explicit request is told apart from that)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    explicit = set()
    for item in argv:
        if refused_argument(item):
            raise ArgumentsError(refused_argument(item))
    if argv and argv[0].endswith(ARGUMENT_FILE_SUFFIXES):
        explicit |= set_file_defaults(parser, argv.pop(0))
    for item in argv:
        if item.startswith("--"):
            # resolved as argparse resolves it: dash aliases (--do-train), --no_ flags, unambiguous abbreviations
            parsed = parser._parse_optional(item)  # (action, option, value); a list of them on Python >= 3.12
            if isinstance(parsed, list):
                parsed = parsed[0] if len(parsed) == 1 else None
            if parsed and parsed[0] is not None:
                explicit.add(parsed[0].dest)
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments' own checks (bf16 without a GPU, strategies that do not fit, ...)
        raise ArgumentsError(str(error)) from error
    training_args.explicit_arguments = frozenset(explicit)
    return model_args, data_args, training_args


def _field_types() -> dict[str, tuple]:
    """For every argument name, the Python types its dataclass field accepts (`NoneType` included when optional)."""
    accepted = {}
    for cls in (ModelArguments, DataArguments, PMNERTrainingArguments):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a hint that does not resolve: fall back to the raw annotations below
            hints = {}
        for item in dataclasses.fields(cls):
            hint = hints.get(item.name, item.type)
            members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            accepted[item.name] = tuple(typing.get_origin(member) or member for member in members)
    return accepted


def _check_file_value(path: str, key: str, value, action, accepted: tuple):
    """A value of an argument file, converted and checked as the same text on the command line would be."""

    def fail(expected: str):
        raise ArgumentsError(f"{path}: {key}: expected {expected}, got {value!r} ({type(value).__name__})")

    if value is None:
        if type(None) in accepted or action.default is None:
            return None
        fail("a value (null is not allowed here)")
    is_bool_flag = action.type is string_to_bool
    boolean_field = bool in accepted and set(accepted) <= {bool, type(None)}  # also behind a --no_ flag's action
    if (is_bool_flag or boolean_field) and not isinstance(value, bool):
        fail("true or false")
    if isinstance(value, str):
        converted = value
        if action.type not in (None, str):
            try:
                converted = action.type(value)
            except (TypeError, ValueError) as error:
                raise ArgumentsError(f"{path}: {key}: {value!r} is not valid here ({error})") from error
        if action.choices and converted not in action.choices:
            fail(f"one of {list(action.choices)}")
        return converted
    if isinstance(value, bool):
        if is_bool_flag or bool in accepted:
            return value
        fail(_describe(action, accepted))
    if isinstance(value, (int, float)):
        if action.type is int or (int in accepted and float not in accepted and not is_bool_flag):
            if isinstance(value, float):
                fail("an integer")
            return value
        if action.type is float or float in accepted:
            return float(value)
        fail(_describe(action, accepted))
    if isinstance(value, list):
        if action.nargs in ("+", "*") or list in accepted:
            element = _element_of(action)
            return [_check_file_value(path, f"{key}[{index}]", item, element, ()) for index, item in enumerate(value)]
        fail(_describe(action, accepted))
    if isinstance(value, dict):
        if dict in accepted:
            return value
        fail(_describe(action, accepted))
    fail(_describe(action, accepted))


def _element_of(action):
    """The action of one element of a list argument: same type and choices, a single value, no default."""
    element = copy.copy(action)
    element.nargs, element.default = None, ""
    return element


def _describe(action, accepted: tuple) -> str:
    if action.type is string_to_bool:
        return "true or false"
    if action.type is int:
        return "an integer"
    if action.type is float:
        return "a number"
    names = [getattr(item, "__name__", str(item)) for item in accepted if item is not type(None)]
    return "a " + " or ".join(names or ["string"])


class DuplicateKeyError(ValueError):
    """A key given twice in an argument file (the loaders would silently keep the last)."""


def _unique_keys(path: str, pairs, line: int | None = None) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            where = f" (line {line})" if line else ""
            raise DuplicateKeyError(f"the key {key!r} is given twice{where}: keep one")
        seen[key] = value
    return seen


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a mapping with a key given twice, naming the key and its line."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise DuplicateKeyError(f"a key must be a name, got {type(key).__name__} (line {key_node.start_mark.line + 1})")
            if key in keys:
                raise DuplicateKeyError(f"the key {key!r} is given twice (line {key_node.start_mark.line + 1}): keep one")
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def set_file_defaults(parser: HfArgumentParser, path: str) -> set[str]:
    """Makes the settings of a JSON / YAML file the parser's defaults, so that command-line arguments override them.
    Each value is checked and converted as the command line would (a string is read like command-line text; a number
    for a flag, a fraction for an integer, a list for a single value are errors naming the file and the key).
    Returns the names of the settings."""
    if not os.path.isfile(path):
        raise ArgumentsError(f"{path}: no such argument file")
    try:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".json"):
                settings = json.load(handle, object_pairs_hook=lambda pairs: _unique_keys(path, pairs))
            else:
                settings = yaml.load(handle, Loader=_UniqueKeyLoader)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ArgumentsError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {error}") from error
    except UnicodeDecodeError as error:
        raise ArgumentsError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except DuplicateKeyError as error:
        raise ArgumentsError(f"{path}: {error}") from error
    if not isinstance(settings, dict):
        raise ArgumentsError(f"{path}: expected a mapping of argument names to values, got {type(settings).__name__}")
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    aliases = {
        option[2:]: action.dest
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option[2:] not in actions and "-" not in option[2:]
    }
    for key in [key for key in settings if key in aliases]:  # model_name_or_path: text_model_name_or_path
        if aliases[key] in settings:
            raise ArgumentsError(f"{path}: {key} and {aliases[key]} are the same argument: keep one")
        settings[aliases[key]] = settings.pop(key)
    refused = [key for key in settings if key in REFUSED_RUN_NER_ARGUMENTS]
    if refused:
        raise ArgumentsError(f"{path}: {refused_argument('--' + refused[0])}")
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        raise ArgumentsError(f"{path}: unknown arguments {unknown} (see `python train_pmner.py --help`)")
    accepted = _field_types()
    checked = {
        key: _check_file_value(path, key, value, actions[key], accepted.get(key, ())) for key, value in settings.items()
    }
    parser.set_defaults(**checked)
    return set(settings)
