"""A features dataset as files: `save_features_dataset` (a folder) and `push_features_dataset_to_hub` (a Hub dataset
repository) write it with its dataset card (`README.md`) and `pmner_features.json`; `load_features_dataset` reads
either back. What the dataset holds and how it is made: `features_dataset.py`.
"""

import json
import os

import datasets
import pyarrow


FORMAT = "pmner-frr-features"
FORMAT_VERSION = 1
METADATA_FILE = "pmner_features.json"


class FeaturesDatasetError(ValueError):
    """A features dataset that cannot be exported, read or used for this run; the message is one line naming the
    dataset and the field or setting at fault."""


# ----------------------------------------------------------------------------------------------------------------------
# Writing: the card, the metadata file, a folder or the Hub
# ----------------------------------------------------------------------------------------------------------------------


def card_metadata(metadata: dict) -> dict:
    """What the card's YAML records under `pmner_features` (the same as `pmner_features.json`, without the counts)."""
    return {key: metadata[key] for key in ("format", "format_version", "fingerprint", "feature_settings",
                                           "weights_sha256", "weights_origin", "feature_dim", "max_objects",
                                           "features_dtype")}


def card_text(metadata: dict) -> str:
    """The text of the dataset card: what the data is, how to use it, its fields and the FRR settings."""
    settings = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in sorted(metadata["feature_settings"].items()))
    weights = "\n".join(
        f"| {component} | `{metadata['weights_origin'].get(component)}` | `{sha256}` |"
        for component, sha256 in sorted(metadata["weights_sha256"].items())
    )
    splits = "\n".join(
        f"| {split} | {counts['images']} | {counts['images_found']} | {counts['images_with_features']} |"
        for split, counts in metadata["splits"].items()
    )
    return f"""
# P-MNER FRR features

Object features of the images of a multimodal NER data set, extracted by the FRR image processor of P-MNER (a
detector finds up to {metadata['max_objects']} objects per image, each crop is encoded by a ResNet backbone; the whole
image fills a free slot where the settings say so). **It holds no image**: the features stand in for images that are
hard to get or may not be redistributed. The tweets' text and tags are not included either; the rows are keyed by the
image id the tweets name (`IMGID:` in the CoNLL files).

Train on it with the same FRR settings and weights (the run refuses others, naming both values):

```bash
python train_pmner.py --dataset_name twitter2017 --data_dir <text files> --features_dataset <this dataset> \\
    --do_train --do_eval --do_predict --output_dir runs/from-features ...
```

## Fields

| field | what |
| --- | --- |
| `image_id` | the image id of the tweets |
| `image_found` | whether the image was there at export (false: no features; a run from the images reads such a tweet as text-only) |
| `visual_features` | ({metadata['max_objects']}, {metadata['feature_dim']}) {metadata['features_dtype']}: one feature per object slot |
| `visual_mask` | {metadata['max_objects']} bools: the slots holding an object |
| `num_detections` | detections above the score threshold, before the whole-image filler (-1: not recorded) |

The detector's boxes, labels and scores are not kept by the FRR feature cache and are not part of this dataset.

## FRR settings

Feature width: **{metadata['feature_dim']}**; objects per image: **{metadata['max_objects']}**; features stored as
{metadata['features_dtype']}; cache fingerprint `{metadata['fingerprint']}`. `{METADATA_FILE}` records the same
settings for programs (`train_pmner.py --features_dataset` reads it).

| setting | value |
| --- | --- |
{settings}

| weights | origin | sha256 of the tensors |
| --- | --- | --- |
{weights}

## Splits

| split | images | images found | images with features |
| --- | --- | --- | --- |
{splits}

The images these features were computed from keep their own terms of use (for the Twitter MNER benchmarks, those set
by Twitter); check them before redistributing derived data.
"""


def _card(metadata: dict, existing: str | None = None):
    """The dataset card: an existing card's YAML (what `push_to_hub` wrote: `configs`, `dataset_info`) kept, with
    this export's `pmner_features`, tags and text."""
    from huggingface_hub import DatasetCard, DatasetCardData

    if existing:
        card = DatasetCard(existing)
    else:
        card = DatasetCard(f"---\n{DatasetCardData().to_yaml()}\n---\n")
    data = card.data.to_dict()
    data.update(
        pretty_name=data.get("pretty_name") or "P-MNER FRR features",
        tags=sorted(set(data.get("tags") or []) | {"pmner", "frr-features", "multimodal-ner"}),
        task_categories=data.get("task_categories") or ["token-classification"],
        pmner_features=card_metadata(metadata),
    )
    return DatasetCard(f"---\n{DatasetCardData(**data).to_yaml()}\n---\n{card_text(metadata)}")


def _metadata_bytes(metadata: dict) -> bytes:
    return (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_features_dataset(dataset_dict: datasets.DatasetDict, metadata: dict, folder: str | os.PathLike) -> str:
    """Writes the features dataset to `folder` (`save_to_disk`), with `pmner_features.json` and the card
    (`README.md`). A folder holding anything but an earlier export is refused."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FeaturesDatasetError(f"--output_dir {folder!r} is a file, not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, METADATA_FILE)):
        raise FeaturesDatasetError(f"--output_dir {folder!r} is not empty and holds no features dataset: choose a new folder")
    dataset_dict.save_to_disk(folder)
    with open(os.path.join(folder, METADATA_FILE), "wb") as handle:
        handle.write(_metadata_bytes(metadata))
    _card(metadata).save(os.path.join(folder, "README.md"))
    return folder


def push_features_dataset_to_hub(
    dataset_dict: datasets.DatasetDict,
    metadata: dict,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    max_shard_size: int | str = "500MB",
    commit_message: str | None = None,
):
    """Uploads the features dataset to a Hub dataset repository as Parquet (`DatasetDict.push_to_hub`), then its card
    (`README.md`, keeping the `configs:` and `dataset_info:` that the push wrote) and `pmner_features.json` in one
    commit. An earlier export's `pmner_features.json` is deleted before the data is replaced, so that no reader ever
    pairs new features with old settings. Returns the last commit's `CommitInfo`."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from training_pmner.twitter_mner_hub import hub_transport_errors

    api = HfApi(token=token)
    where = f"dataset repository {repo_id} on {api.endpoint}"
    if token is None and get_token() is None:
        raise FeaturesDatasetError(f"cannot push to the {where}: no Hub token (pass --token, set HF_TOKEN or run "
                                   "`hf auth login`)")
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if api.file_exists(repo_id, METADATA_FILE, repo_type="dataset"):
            api.delete_file(METADATA_FILE, repo_id, repo_type="dataset", commit_message="Features being replaced")
        commit = dataset_dict.push_to_hub(repo_id, token=token, max_shard_size=max_shard_size,
                                          commit_message=commit_message or "Upload FRR features")
        readme = api.hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=commit.oid)
        with open(readme, encoding="utf-8") as handle:
            card = _card(metadata, handle.read())
        return api.create_commit(
            repo_id, repo_type="dataset", commit_message="FRR settings and dataset card", parent_commit=commit.oid,
            operations=[CommitOperationAdd("README.md", str(card).encode("utf-8")),
                        CommitOperationAdd(METADATA_FILE, _metadata_bytes(metadata))],
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        raise FeaturesDatasetError(f"the Hub refused the push to the {where} (HTTP {status}): {error}") from error
    except hub_transport_errors() as error:
        raise FeaturesDatasetError(f"cannot reach the Hub to push to the {where}: {type(error).__name__}: {error}") from error


# ----------------------------------------------------------------------------------------------------------------------
# Reading (train_pmner.py --features_dataset)
# ----------------------------------------------------------------------------------------------------------------------


# what `load_from_disk` / `load_dataset` raise on a folder with missing, truncated or foreign data files
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, NotImplementedError,
                datasets.exceptions.DatasetsError, pyarrow.ArrowException)


def load_features_dataset(
    source: str, cache_dir: str | None = None, token: str | bool | None = None, revision: str | None = None
) -> tuple[datasets.DatasetDict, dict]:
    """`(DatasetDict, metadata)` of a features dataset: a local folder (`save_features_dataset`'s, or Parquet files
    with their card) or a Hub dataset repository (downloaded at one revision into `cache_dir`, with `token`)."""
    folder = source
    if not os.path.isdir(source):
        from huggingface_hub import snapshot_download

        from training_pmner.twitter_mner_hub import hub_transport_errors

        try:
            from huggingface_hub.errors import HfHubHTTPError
        except ImportError:  # pragma: no cover
            HfHubHTTPError = OSError
        try:
            folder = snapshot_download(source, repo_type="dataset", cache_dir=cache_dir, token=token, revision=revision)
        except (OSError, ValueError, HfHubHTTPError, *hub_transport_errors()) as error:
            message = " ".join(str(error).split())
            raise FeaturesDatasetError(
                f"--features_dataset {source!r} is neither a local folder nor a Hub dataset repository this run can "
                f"download: {message}"
            ) from error
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        raise FeaturesDatasetError(
            f"--features_dataset {source!r} has no {METADATA_FILE}: it is not a features dataset written by "
            "`python -m training_pmner.features_dataset export`"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as error:
        raise FeaturesDatasetError(f"--features_dataset {source!r}: {METADATA_FILE} is unreadable ({error})") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise FeaturesDatasetError(f"--features_dataset {source!r}: {METADATA_FILE} is not a {FORMAT} record")
    for key in ("feature_settings", "weights_sha256", "feature_dim", "max_objects"):
        if key not in metadata:
            raise FeaturesDatasetError(f"--features_dataset {source!r}: {METADATA_FILE} has no field {key!r}")
    try:
        if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
            dataset_dict = datasets.load_from_disk(folder)
        else:
            dataset_dict = datasets.load_dataset(folder)
    except _READ_ERRORS as error:
        where = "" if folder == source else f" (downloaded to {folder})"
        message = " ".join(str(error).split())
        raise FeaturesDatasetError(
            f"--features_dataset {source!r}{where} has {METADATA_FILE} but its data cannot be read: "
            f"{type(error).__name__}: {message}"
        ) from error
    if not isinstance(dataset_dict, datasets.DatasetDict):
        dataset_dict = datasets.DatasetDict(train=dataset_dict)
    return dataset_dict, metadata


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "FeaturesDatasetError",
    "card_metadata",
    "card_text",
    "load_features_dataset",
    "push_features_dataset_to_hub",
    "save_features_dataset",
]
