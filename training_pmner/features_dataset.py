"""Shareable FRR features: the object features of a data set's images as a `datasets.DatasetDict`, with no image.

Tweet images are hard to get and may not be redistributed; their FRR features (what the model reads of them) can be.
An export holds, per split, one row per distinct image id of that split's tweets:

- `image_id` (string): the key the tweets name (`IMGID:` of the CoNLL files);
- `image_found` (bool): whether the tweet's image was there at export (false: a missing image, which a run from the
  images would also have processed text-only);
- `visual_features` (`Array2D` (max_objects, feature_dim), float32, or float16 on request);
- `visual_mask` (max_objects bools): the slots holding an object;
- `num_detections` (int32): detections above the threshold before the whole-image filler (-1: not recorded).

The FRR feature cache keeps these and nothing more: the detector's boxes, labels and scores are not cached, so they
are not exported. The settings that made the features (the image processor's `FEATURE_SETTINGS`, the sha256 of the
detector and backbone weights, the feature width) are written to `pmner_features.json` (read by
`train_pmner.py --features_dataset`, which refuses a dataset whose settings or weights differ from its run's) and to
the dataset card (`README.md`, in its YAML metadata and its text); `features_dataset_io.py` writes and reads
these files.

    python -m training_pmner.features_dataset export --processor runs/t17 --dataset_name twitter2017 \
        --data_dir data/twitter2017 --image_dir images --feature_cache_dir runs/t17/frr_cache \
        --push_to_hub user/twitter2017-frr-features          # or --output_dir folder (save_to_disk)
    python train_pmner.py --dataset_name twitter2017 --data_dir data/twitter2017 \
        --features_dataset user/twitter2017-frr-features ...  # no --image_dir

`pmner-export-features` is the same command as `python -m training_pmner.features_dataset export`.
"""

import argparse
import json
import logging
import os
import sys
import types

import datasets
import numpy as np

from .features_dataset_io import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    FeaturesDatasetError,
    load_features_dataset,
    push_features_dataset_to_hub,
    save_features_dataset,
)


logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("image_id", "visual_features", "visual_mask")
OPTIONAL_FIELDS = ("image_found", "num_detections")
FEATURES_DTYPES = ("float32", "float16")
MISSING_KEY_PREFIX = "missing:"  # how the dataset extraction keys a tweet without image (never cached)
_EXAMPLES = 5  # ids named in a message


# ----------------------------------------------------------------------------------------------------------------------
# What the features were made with
# ----------------------------------------------------------------------------------------------------------------------


def _plain(value):
    """`value` as JSON gives it back (tuples as lists), for comparing settings read from a file with live ones."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def frr_record(image_processor) -> dict:
    """What identifies the features of `image_processor`: its feature settings (`FEATURE_SETTINGS`, `crop_size`
    resolved), the sha256 of the detector and backbone weights in use, their origin, the feature width and the
    objects per image, and its cache fingerprint."""
    from processing_pmner.image_settings import feature_settings, frr_weights_sha256

    return _plain({
        "feature_settings": feature_settings(image_processor),
        "weights_sha256": frr_weights_sha256(image_processor),
        "weights_origin": {"backbone": image_processor.backbone_weights,
                           "detector": image_processor.detector_weights if image_processor.detector else None},
        "feature_dim": image_processor.feature_dim,
        "max_objects": image_processor.max_objects,
        "fingerprint": image_processor.fingerprint(),
    })


def _features_schema(max_objects: int, feature_dim: int, dtype: str) -> datasets.Features:
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "image_found": datasets.Value("bool"),
        "visual_features": datasets.Array2D(shape=(max_objects, feature_dim), dtype=dtype),
        "visual_mask": datasets.List(datasets.Value("bool"), length=max_objects),
        "num_detections": datasets.Value("int32"),
    })


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


def build_features_dataset(
    image_processor,
    data: datasets.DatasetDict,
    cache_dir: str | os.PathLike,
    features_dtype: str = "float32",
    cache_dtype: str = "float32",
    device=None,
    progress: bool = True,
    datasets_cache_dir: str | None = None,
) -> tuple[datasets.DatasetDict, dict]:
    """The features dataset of `data`'s image ids: `(DatasetDict, metadata)`.

    `data` holds the tweets (splits with an `image_id` column and, where the images are at hand, an `image` column of
    paths or bytes). With images, the ones not yet in the FRR cache of `image_processor` under `cache_dir` (the
    `--feature_cache_dir` of a training run) are extracted into it first, exactly as a training run does; a tweet
    whose image is missing gets no features (`image_found` false, all-false mask), as it does in training. Without
    images (an `image` column of None, or none), the features are read from the cache by image id; ids not in the
    cache are exported without features (`image_found` false) and counted in a warning, naming a few. A cache that
    holds none of the ids (its folder missing: other settings, weights or `cache_dtype` than the run that filled
    it) is refused (`FeaturesDatasetError` naming the folder looked for and the cache folders there are).

    Args:
        image_processor: the `PMNERImageProcessor` whose features these are (e.g. a trained folder's).
        data: e.g. `load_twitter_mner(..., image_dir=...)`.
        cache_dir: the FRR cache folder (features are read from `<cache_dir>/frr-<fingerprint>[-fp16]/`).
        features_dtype: "float32" (default; the features as cached in float32) or "float16" (half the size; a run
            from it gives other scores than a run from the images).
        cache_dtype: the dtype of the cache to read (and to fill).
        datasets_cache_dir: where `datasets` writes the export's Arrow files (default: its cache).
    """
    from datasets.fingerprint import Hasher

    if features_dtype not in FEATURES_DTYPES:
        raise FeaturesDatasetError(f"features_dtype must be one of {FEATURES_DTYPES}, got {features_dtype!r}")
    if not data:
        raise FeaturesDatasetError("the data has no split to export")
    for split, dataset in data.items():
        if "image_id" not in dataset.column_names:
            raise FeaturesDatasetError(f"split {split!r} of the data has no field 'image_id' (fields: {dataset.column_names})")
    with_images = any(any(value is not None for value in _image_sources(dataset) or []) for dataset in data.values())
    if with_images:
        for split, dataset in data.items():  # fills the cache with what a training run extracts (same code path)
            image_processor.extract_dataset_features(
                dataset, cache_dir=cache_dir, device=device, progress=progress, cache_dtype=cache_dtype
            )
    record = frr_record(image_processor)
    cache = image_processor.feature_cache(cache_dir).with_dtype(cache_dtype).load()
    shards = [os.path.basename(path) for path in cache.shard_files()]
    schema = _features_schema(record["max_objects"], record["feature_dim"], features_dtype)
    splits = {split: _distinct_keys(dataset, with_images) for split, dataset in data.items()}  # split: (ids, keys)
    not_cached = []
    if not with_images:  # the cache is all there is: one of other settings, weights or dtype would export nothing
        all_ids = [image_id for ids, _ in splits.values() for image_id in ids]
        not_cached = [image_id for image_id, position in zip(all_ids, cache.positions(all_ids)) if position < 0]
        if all_ids and len(not_cached) == len(all_ids):
            cache.close()
            raise FeaturesDatasetError(_empty_cache_message(cache, cache_dir, len(all_ids)))
    result, counts = {}, {}
    for split, (ids, keys) in splits.items():
        fingerprint = Hasher.hash([FORMAT_VERSION, cache.folder, shards, ids, keys, features_dtype, with_images, record])
        result[split] = datasets.Dataset.from_generator(
            _rows, features=schema, fingerprint=fingerprint, split=split, cache_dir=datasets_cache_dir,
            gen_kwargs={"cache": cache, "ids": ids, "keys": keys, "record": record, "dtype": features_dtype,
                        "with_images": with_images},
        )
        found = sum(1 for key in keys if not key.startswith(MISSING_KEY_PREFIX))
        if not with_images:
            found = int((cache.positions(keys) >= 0).sum()) if keys else 0
        counts[split] = {"images": len(ids), "images_found": found,
                         "images_with_features": int(np.count_nonzero(np.asarray(result[split]["visual_mask"]).any(1)))
                         if len(ids) else 0}
    cache.close()
    if not_cached:
        logger.warning(
            f"{len(not_cached)} image ids are not in the FRR cache {cache.folder} (exported without features, "
            f"image_found false), e.g. {', '.join(not_cached[:_EXAMPLES])}"
        )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **record,
        "features_dtype": features_dtype,
        "fields": list(schema),
        "splits": counts,
    }
    return datasets.DatasetDict(result), metadata


def _empty_cache_message(cache, cache_dir, count: int) -> str:
    """Why a read from the cache alone finds none of the data's `count` image ids: the folder of the processor's
    fingerprint and dtype is missing or holds other images; names the FRR cache folders that `cache_dir` does hold."""
    cache_dir = os.fspath(cache_dir)
    others = sorted(
        name for name in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else [])
        if name.startswith("frr-") and os.path.isdir(os.path.join(cache_dir, name))
    )
    held = f"{cache_dir} holds {', '.join(others)}" if others else f"{cache_dir} holds no FRR cache folder (frr-*)"
    if not os.path.isdir(cache.folder):
        what = "does not exist"
    else:
        what = f"holds none of the data's {count} image ids ({len(cache)} images cached there)"
    return (
        f"no image to extract from and the FRR cache folder {cache.folder} (the --processor's fingerprint "
        f"{cache.fingerprint}, --cache_dtype {cache.dtype}) {what}; {held}. Pass the --feature_cache_dir, "
        "--cache_dtype and processor (trained folder: same FRR settings and weights, frr_weights_dtype included) of "
        "the run that filled the cache, or --image_dir to extract the features"
    )


def _image_sources(dataset):
    """The `image` column without decoding (paths / bytes / None), or None when there is no such column."""
    if "image" not in dataset.column_names:
        return None
    if isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset["image"]


def _distinct_keys(dataset, with_images: bool) -> tuple[list[str], list[str]]:
    """The split's distinct image ids (first appearance order) and their cache keys (`missing:<id>`: no image)."""
    image_ids = [str(value) for value in dataset["image_id"]]
    sources = _image_sources(dataset) if with_images else None
    keys = {}
    for row, image_id in enumerate(image_ids):
        if image_id not in keys:
            missing = sources is not None and sources[row] is None
            keys[image_id] = MISSING_KEY_PREFIX + image_id if missing else image_id
    return list(keys), list(keys.values())


def _rows(cache, ids, keys, record, dtype, with_images, chunk=256):
    """The export's rows, read from the cache `chunk` at a time (features of absent keys: zeros)."""
    objects, width = record["max_objects"], record["feature_dim"]
    for start in range(0, len(ids), chunk):
        part_ids, part_keys = ids[start : start + chunk], keys[start : start + chunk]
        positions = cache.positions(part_keys)  # (n,) index position or -1
        features = np.zeros((len(part_ids), objects, width), dtype=np.float32)  # (n, M, D)
        masks = np.zeros((len(part_ids), objects), dtype=bool)  # (n, M)
        detections = np.zeros(len(part_ids), dtype=np.int32)  # (n,)
        present = positions >= 0
        if present.any():
            read, read_masks, read_detections = cache.read_positions(positions[present])
            if tuple(read.shape[1:]) != (objects, width):
                raise FeaturesDatasetError(
                    f"the FRR cache {cache.folder} holds features of shape {tuple(read.shape[1:])}; the image "
                    f"processor gives ({objects}, {width})"
                )
            features[present], masks[present], detections[present] = read.numpy(), read_masks.numpy(), read_detections.numpy()
        if dtype == "float16":
            stored = features.astype(np.float16)
            if not np.isfinite(stored).all():
                raise FeaturesDatasetError("features beyond float16's range: export them as float32")
            features = stored
        for index, image_id in enumerate(part_ids):
            yield {
                "image_id": image_id,
                "image_found": not part_keys[index].startswith(MISSING_KEY_PREFIX) if with_images else bool(present[index]),
                "visual_features": features[index],
                "visual_mask": masks[index],
                "num_detections": int(detections[index]),
            }


# ----------------------------------------------------------------------------------------------------------------------
# Checking and attaching (train_pmner.py --features_dataset)
# ----------------------------------------------------------------------------------------------------------------------


def _shape_of(feature) -> tuple | None:
    return tuple(feature.shape) if isinstance(feature, (datasets.Array2D,)) else None


def check_features_dataset(
    dataset_dict: datasets.DatasetDict, metadata: dict, image_processor, visual_feature_dim: int, max_objects: int,
    source: str,
) -> None:
    """Refuses (`FeaturesDatasetError`, one line) a features dataset that this run cannot use: a required field
    missing, features of another width or object count than the model's, or FRR settings or weights other than
    those of the run's image processor (naming both values)."""
    where = f"--features_dataset {source!r}"
    for split, dataset in dataset_dict.items():
        missing = [name for name in REQUIRED_FIELDS if name not in dataset.column_names]
        if missing:
            raise FeaturesDatasetError(
                f"{where}: split {split!r} has no field {missing[0]!r} (a features dataset has "
                f"{', '.join(REQUIRED_FIELDS)}; this one has {', '.join(dataset.column_names)})"
            )
        shape = _shape_of(dataset.features["visual_features"])
        if shape is None or len(shape) != 2:
            raise FeaturesDatasetError(
                f"{where}: field visual_features of split {split!r} is {dataset.features['visual_features']}, not an "
                "Array2D (max_objects, feature_dim)"
            )
        if shape[1] != visual_feature_dim:
            raise FeaturesDatasetError(
                f"{where}: field visual_features has feature width {shape[1]}; the model's visual_feature_dim is "
                f"{visual_feature_dim}"
            )
        if shape[0] != max_objects:
            raise FeaturesDatasetError(
                f"{where}: field visual_features has {shape[0]} objects per image; the model's max_objects is "
                f"{max_objects}"
            )
        mask = dataset.features["visual_mask"]
        if getattr(mask, "length", None) != max_objects:
            raise FeaturesDatasetError(
                f"{where}: field visual_mask is {mask}; expected {max_objects} bools (the model's max_objects)"
            )
        if metadata["feature_dim"] != shape[1]:
            raise FeaturesDatasetError(
                f"{where}: field visual_features has feature width {shape[1]}, but {METADATA_FILE} records "
                f"feature_dim {metadata['feature_dim']}"
            )
    run = frr_record(image_processor)
    differences = []
    saved, wanted = metadata["feature_settings"], run["feature_settings"]
    for key in sorted(set(saved) | set(wanted)):
        if _plain(saved.get(key, "<not recorded>")) != wanted.get(key, "<not recorded>"):
            differences.append(f"{key} {json.dumps(saved.get(key, '<not recorded>'))} in the dataset, "
                               f"{json.dumps(wanted.get(key, '<not recorded>'))} in this run")
    saved, wanted = metadata["weights_sha256"], run["weights_sha256"]
    for component in sorted(set(saved) | set(wanted)):
        if saved.get(component) != wanted.get(component):
            differences.append(f"{component} weights sha256 {saved.get(component) or 'none'} in the dataset, "
                               f"{wanted.get(component) or 'none'} in this run (--{component}_weights)")
    if differences:
        raise FeaturesDatasetError(
            f"{where} was extracted with other FRR settings than this run's: {'; '.join(differences)}. Pass the "
            "dataset's FRR settings and weights (its card lists them), or extract features from the images"
        )


def features_dataset_columns(
    raw: datasets.DatasetDict, dataset_dict: datasets.DatasetDict, metadata: dict, source: str
) -> datasets.DatasetDict:
    """`raw`'s splits with the columns a run from the images has after `extract_dataset_features`
    (`visual_features` float32, `visual_mask`, `visual_num_detections` where every count is known), plus
    `image_found`, looked up by
    `image_id` in the features dataset (all its splits). Image ids of `raw` that the features dataset lacks are an
    error naming how many and a few of them."""
    from datasets.fingerprint import Hasher

    from processing_pmner.image_dataset_features import feature_columns

    fields = [name for name in REQUIRED_FIELDS + OPTIONAL_FIELDS
              if all(name in dataset.column_names for dataset in dataset_dict.values())]
    parts = [dataset.select_columns(fields) for dataset in dataset_dict.values()]
    try:
        merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except ValueError as error:
        raise FeaturesDatasetError(f"--features_dataset {source!r}: its splits have fields of different types "
                                   f"({' '.join(str(error).split())})") from error
    row_of = {}
    for row, image_id in enumerate(merged["image_id"]):
        row_of.setdefault(str(image_id), row)
    missing = sorted({str(image_id) for dataset in raw.values() for image_id in dataset["image_id"]} - set(row_of))
    if missing:
        raise FeaturesDatasetError(
            f"--features_dataset {source!r} has no features for {len(missing)} image ids of the data, e.g. "
            f"{', '.join(missing[:_EXAMPLES])} (was it exported from other data?)"
        )
    shape = merged.features["visual_features"].shape
    source_fingerprint = Hasher.hash([[dataset._fingerprint for dataset in dataset_dict.values()], metadata])
    table = merged.with_format("numpy")
    # detection counts, as a run from the images has them: left out where part of the features has none (-1); only
    # that column is read (the features of a whole data set can take gigabytes)
    with_counts = "num_detections" in fields and not (
        merged.select_columns(["num_detections"]).with_format("numpy")[:]["num_detections"] < 0
    ).any()
    result = {}
    for split, dataset in raw.items():
        rows = np.array([row_of[str(image_id)] for image_id in dataset["image_id"]], dtype=np.int64)  # (tweets,)

        def add(batch, indices, rows=rows):
            values = table[rows[indices]]
            found = values["image_found"] if "image_found" in fields else values["visual_mask"].any(1)
            output = {
                "visual_features": values["visual_features"].astype(np.float32),  # (b, M, D)
                "visual_mask": values["visual_mask"].astype(bool),  # (b, M)
                "image_found": found.astype(bool),  # (b,)
            }
            if with_counts:
                output["visual_num_detections"] = values["num_detections"].astype(np.int32)  # (b,)
            return output

        base, features = feature_columns(dataset, shape[0], shape[1], with_counts,
                                         extra={"image_found": datasets.Value("bool")})
        result[split] = base.map(
            add, batched=True, with_indices=True, features=features, desc=f"Adding FRR features of {split}",
            new_fingerprint=Hasher.hash([base._fingerprint, source_fingerprint, FORMAT_VERSION]),
        )
    return datasets.DatasetDict(result)


def attach_features_dataset(raw, source: str, image_processor, model_config, cache_dir=None, token=None,
                            main_process_first=None) -> datasets.DatasetDict:
    """`train_pmner.py --features_dataset`: reads the features dataset (the main process first: it downloads),
    checks it against the run's image processor and model, and adds its features to `raw`'s splits."""
    import contextlib

    guard = main_process_first(desc="features dataset") if main_process_first else contextlib.nullcontext()
    with guard:
        dataset_dict, metadata = load_features_dataset(source, cache_dir=cache_dir, token=token)
        check_features_dataset(dataset_dict, metadata, image_processor, model_config.visual_feature_dim,
                               model_config.max_objects, source)
        if metadata.get("features_dtype") == "float16":
            logger.info(f"--features_dataset {source!r} holds float16 features (read as float32): the scores differ "
                        "from those of a run from the images or from float32 features")
        return features_dataset_columns(raw, dataset_dict, metadata, source)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export the FRR features of a data set's images as a features dataset (no image in it), to a "
        "folder or a Hub dataset repository, for `train_pmner.py --features_dataset`.",
    )
    parser.add_argument("--processor", required=True,
                        help="A trained P-MNER folder (or Hub model) or a saved image-processor folder: the FRR "
                        "settings and weights of the features.")
    parser.add_argument("--dataset_name", default="twitter2017",
                        help="twitter2015 or twitter2017 (the tweets' format), or a Hub dataset repository made by "
                        "push_twitter_mner_to_hub (with --dataset_config_name).")
    parser.add_argument("--dataset_config_name", help="Config of a Hub dataset repository: twitter2015 or twitter2017.")
    parser.add_argument("--data_dir", help="Folder with train.txt, valid.txt, test.txt (the tweets name the image "
                        "ids); downloaded when omitted.")
    parser.add_argument("--train_file", help="CoNLL files instead of --data_dir (with --validation_file, --test_file).")
    parser.add_argument("--validation_file")
    parser.add_argument("--test_file")
    parser.add_argument("--image_dir", help="Folder with <IMGID>.jpg: images not yet in the cache are extracted into "
                        "it. Without it the features are read from the cache alone.")
    parser.add_argument("--feature_cache_dir", required=True,
                        help="The FRR cache (a training run's --feature_cache_dir, default <output_dir>/frr_cache).")
    parser.add_argument("--cache_dtype", default="float32", choices=FEATURES_DTYPES, help="dtype of the cache to read.")
    parser.add_argument("--features_dtype", default="float32", choices=FEATURES_DTYPES,
                        help="dtype of the exported features (float16: half the size, other scores than the images').")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output_dir", help="Write the dataset here (save_to_disk, with its card).")
    where.add_argument("--push_to_hub", metavar="REPO_ID", help="Push it to this Hub dataset repository (Parquet).")
    parser.add_argument("--private", action="store_true", help="Create the Hub repository private.")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`).")
    parser.add_argument("--max_shard_size", default="500MB", help="Largest Parquet file pushed.")
    parser.add_argument("--device", help="Where the FRR networks run (default: CUDA when available).")
    return parser


def export_main(argv: list[str] | None = None, prog: str = "pmner-export-features") -> int:
    """`pmner-export-features ...` / `python -m training_pmner.features_dataset export ...`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def fail(message: str):
        print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
        sys.exit(2)

    files = [args.train_file, args.validation_file, args.test_file]
    if any(files) and not all(files):
        fail("--train_file, --validation_file and --test_file go together")
    if any(files) and args.data_dir:
        fail("--data_dir and --train_file both name the tweets: pass one of them")
    benchmark = args.dataset_name in ("twitter2015", "twitter2017")
    if not benchmark and not args.dataset_config_name:
        fail(f"--dataset_name {args.dataset_name!r} is a Hub dataset repository: also pass --dataset_config_name")
    for name in ("data_dir", "image_dir"):
        if getattr(args, name) and not os.path.isdir(getattr(args, name)):
            fail(f"--{name} {getattr(args, name)!r} is not a folder")
    if benchmark and not os.path.isdir(args.feature_cache_dir) and not args.image_dir:
        fail(f"--feature_cache_dir {args.feature_cache_dir!r} is not a folder (and no --image_dir to extract from)")
    from processing_pmner import PMNERImageProcessor

    from .data import load_raw_data

    try:
        image_processor = PMNERImageProcessor.from_pretrained(args.processor)
        image_processor.load_models("cpu")
    except (OSError, ValueError) as error:
        fail(f"--processor {args.processor!r}: {error}")
    data_args = types.SimpleNamespace(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, data_dir=args.data_dir,
        train_file=args.train_file, validation_file=args.validation_file, test_file=args.test_file,
        image_dir=args.image_dir, text_only=False, other_as_misc=True, context_file=None, max_train_samples=None,
        max_eval_samples=None, max_predict_samples=None,
    )
    try:
        data, _ = load_raw_data(data_args)
        dataset_dict, metadata = build_features_dataset(
            image_processor, data, args.feature_cache_dir, features_dtype=args.features_dtype,
            cache_dtype=args.cache_dtype, device=args.device,
        )
        if args.output_dir:
            save_features_dataset(dataset_dict, metadata, args.output_dir)
            print(f"wrote the features dataset to {args.output_dir}")
        else:
            push_features_dataset_to_hub(dataset_dict, metadata, args.push_to_hub, private=args.private or None,
                                         token=args.token, max_shard_size=args.max_shard_size)
            print(f"pushed the features dataset to the Hub dataset repository {args.push_to_hub}")
    except (FeaturesDatasetError, ValueError, OSError) as error:
        fail(error)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m training_pmner.features_dataset export ...`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        build_parser("python -m training_pmner.features_dataset export").print_help()
        return 0
    if not argv or argv[0] != "export":
        print("usage: python -m training_pmner.features_dataset export --help", file=sys.stderr)
        return 2
    return export_main(argv[1:], prog="python -m training_pmner.features_dataset export")


__all__ = [
    "FeaturesDatasetError",
    "attach_features_dataset",
    "build_features_dataset",
    "check_features_dataset",
    "features_dataset_columns",
    "frr_record",
    "load_features_dataset",
    "push_features_dataset_to_hub",
    "save_features_dataset",
]


if __name__ == "__main__":
    sys.exit(main())
