"""The Twitter MNER datasets on the Hub: Parquet export with embedded images and a dataset card, and the push to a Hub
dataset repository (same files), so that `datasets.load_dataset(<folder or repository>, <config>)` reads them with no
code.

```python
from training_pmner.twitter_mner import load_twitter_mner
from training_pmner.twitter_mner_hub import export_to_parquet, push_twitter_mner_to_hub

dataset = load_twitter_mner("twitter2017", data_dir="path/to/twitter2017", image_dir="path/to/images")
export_to_parquet(dataset, "twitter-mner-parquet", "twitter2017")
push_twitter_mner_to_hub(dataset, "user/twitter-mner", "twitter2017", private=True)  # needs a write token
# then, with no code: datasets.load_dataset("user/twitter-mner", "twitter2017", streaming=...)
```
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Optional, Union

import datasets

from .twitter_mner import _CITATION, _DESCRIPTION, _HOMEPAGE


_CARD_BODY = f"""
# Twitter multimodal NER

{_DESCRIPTION}
Columns: `id`, `image_id`, `tokens`, `ner_tags` (ClassLabel; the tag names of each config are in
`dataset_info` above), `image` (embedded bytes; null where the image file was missing).

Load with `datasets.load_dataset(<this repository or folder>, <config>)` (`twitter2015` or `twitter2017`).

Source of the text files: {_HOMEPAGE} (folder `data/`). The images are distributed by the dataset authors.

```bibtex
{_CITATION}```
"""


def _new_dataset_card():
    """The dataset card of a new export or repository: metadata and description, no config yet."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        language=["en"],
        task_categories=["token-classification"],
        task_ids=["named-entity-recognition"],
        pretty_name="Twitter multimodal NER (Twitter-2015, Twitter-2017)",
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{_CARD_BODY}")


def _write_dataset_card(folder: Path, config_name: str, dataset_dict: datasets.DatasetDict, sizes: dict) -> None:
    """Adds (or replaces) `config_name` in `<folder>/README.md`'s `configs:` and `dataset_info:` YAML,
    as `push_to_hub` does; the rest of an existing card is kept."""
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    readme = folder / "README.md"
    card = DatasetCard(readme.read_text(encoding="utf-8")) if readme.is_file() else _new_dataset_card()
    features = next(iter(dataset_dict.values())).features
    info = datasets.DatasetInfo(config_name=config_name, features=features, splits=datasets.SplitDict())
    for split, dataset in dataset_dict.items():
        info.splits.add(datasets.SplitInfo(name=split, num_examples=len(dataset), num_bytes=sizes[split]))
    info.download_size = info.dataset_size = sum(sizes.values())
    DatasetInfosDict({config_name: info}).to_dataset_card_data(card.data)
    data_files = [{"split": split, "path": f"{config_name}/{split}-*"} for split in dataset_dict]
    MetadataConfigs({config_name: {"data_files": data_files}}).to_dataset_card_data(card.data)
    card.save(str(readme))


def export_to_parquet(
    dataset_dict: datasets.DatasetDict,
    folder: Union[str, os.PathLike],
    config_name: str,
    max_shard_size: Union[int, str] = "500MB",
) -> list[str]:
    """Writes a dataset as Parquet with the image bytes embedded, in the Hub's layout.

    Writes `<folder>/<config_name>/<split>-<i>-of-<n>.parquet` (earlier `.parquet` files of that
    subfolder are removed first) and a `<folder>/README.md` dataset card whose `configs:` and
    `dataset_info:` YAML list every config exported to `folder` (features with the ClassLabel names,
    split sizes), so that `datasets.load_dataset(str(folder), config_name)` reads it with no code, and
    so does the Hub after uploading the folder (e.g. `huggingface_hub.upload_folder`).

    Args:
        dataset_dict: e.g. from `load_twitter_mner`; its `image` paths are read and embedded.
        folder: output folder (created if needed).
        config_name: e.g. `"twitter2017"`.
        max_shard_size: largest Parquet file, counting the image bytes (e.g. `"500MB"` or bytes).

    Returns:
        The Parquet files written.
    """
    from datasets.table import embed_table_storage
    from datasets.utils.py_utils import convert_file_size_to_int

    if not dataset_dict:
        raise ValueError("dataset_dict has no split to export")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", config_name):
        raise ValueError(f"config_name must be a plain folder name, got {config_name!r}")
    folder = Path(folder)
    config_folder = folder / config_name
    config_folder.mkdir(parents=True, exist_ok=True)
    for old in glob.glob(str(config_folder / "*.parquet")):
        os.remove(old)
    limit = convert_file_size_to_int(max_shard_size)
    written = []
    sizes = {}
    for split, dataset in dataset_dict.items():
        nbytes = dataset._estimate_nbytes()
        if "image" in dataset.features:
            for value in dataset.cast_column("image", datasets.Image(decode=False))["image"]:
                if value is not None and value.get("bytes") is None and value.get("path"):
                    nbytes += os.path.getsize(value["path"])
        num_shards = max(1, min(len(dataset), int(nbytes / limit) + 1))
        sizes[split] = 0
        for index in range(num_shards):
            shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True).with_format("arrow")
            shard = shard.map(embed_table_storage, batched=True, batch_size=100, keep_in_memory=True)
            path = config_folder / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
            shard.to_parquet(str(path))
            sizes[split] += path.stat().st_size
            written.append(str(path))
    _write_dataset_card(folder, config_name, dataset_dict, sizes)
    return written


class TwitterMNERHubError(ConnectionError):
    """A push to the Hub failed before or while committing: no credentials, an endpoint that cannot be reached, or
    an answer refusing the upload. The message names the repository and the endpoint and says what to do; the
    dataset and its source files are never changed."""


def hub_transport_errors() -> tuple:
    """Connection-level errors of the HTTP client under `huggingface_hub` (`httpx2` in 2.x, `httpx` in 1.x), and
    its offline mode (`HF_HUB_OFFLINE=1`)."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    errors = [OfflineModeIsEnabled]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def push_twitter_mner_to_hub(
    dataset_dict: datasets.DatasetDict,
    repo_id: str,
    config_name: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    max_shard_size: Union[int, str] = "500MB",
    commit_message: Optional[str] = None,
):
    """Uploads one config to a Hub dataset repository as Parquet with embedded images, by
    `datasets.DatasetDict.push_to_hub(repo_id, config_name=...)`.

    A new repository first gets this dataset's card (description, license note, citation: `DatasetCard`);
    `push_to_hub` then adds the config's `configs:` and `dataset_info:` to it, so configs pushed before stay listed,
    and replaces the config's earlier Parquet files. After this, `datasets.load_dataset(repo_id, config_name)` works
    with no code, streaming or not.

    Args:
        dataset_dict: e.g. from `load_twitter_mner`; its `image` paths are read and embedded.
        repo_id: `"user/name"`; the dataset repository is created if needed.
        config_name: e.g. `"twitter2017"`.
        private: visibility when the repository is created (ignored if it exists).
        token: a write token; default: `HF_TOKEN` or the token saved by `hf auth login`.
        max_shard_size: largest Parquet file (e.g. `"500MB"` or bytes).
        commit_message: default `"Upload <config_name>"`.

    Returns:
        The `huggingface_hub.CommitInfo` of the data commit.

    Raises:
        TwitterMNERHubError: no token, endpoint unreachable, or the Hub refused (e.g. 401 / 403).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not dataset_dict:
        raise ValueError("dataset_dict has no split to push")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", config_name):
        raise ValueError(f"config_name must be a plain folder name, got {config_name!r}")
    api = HfApi(token=token)
    where = f"dataset repository {repo_id} on {api.endpoint}"
    if token is None and get_token() is None:
        raise TwitterMNERHubError(
            f"Cannot push to the {where}: no Hub token. Pass token=..., set HF_TOKEN, or run `hf auth login` "
            "with a token that has write access."
        )
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if not api.file_exists(repo_id, "README.md", repo_type="dataset"):  # a new repository: the card's text first
            _new_dataset_card().push_to_hub(repo_id, token=token, repo_type="dataset", commit_message="Dataset card")
        return dataset_dict.push_to_hub(
            repo_id, config_name=config_name, token=token, max_shard_size=max_shard_size,
            commit_message=commit_message or f"Upload {config_name}",
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        hint = (
            " Check that the token is valid and can write to this namespace (pass token=..., set HF_TOKEN or run "
            "`hf auth login`)."
            if status in (401, 403)
            else ""
        )
        raise TwitterMNERHubError(f"The Hub refused the push to the {where} (HTTP {status}): {err}.{hint}") from err
    except hub_transport_errors() as err:
        raise TwitterMNERHubError(
            f"Cannot reach the Hub to push to the {where}: {type(err).__name__}: {err}. Check HF_ENDPOINT and the "
            "network; nothing was uploaded."
        ) from err


__all__ = [
    "TwitterMNERHubError",
    "export_to_parquet",
    "hub_transport_errors",
    "push_twitter_mner_to_hub",
]
