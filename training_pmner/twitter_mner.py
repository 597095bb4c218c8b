"""Twitter-2015 and Twitter-2017 multimodal NER datasets as a `datasets` builder.

The two standard MNER benchmarks (Zhang et al., AAAI 2018; Lu et al., ACL 2018) are distributed,
in the copy of the UMT repository (Yu et al., ACL 2020) that most papers use, as three CoNLL-style
text files per dataset (`train.txt`, `valid.txt`, `test.txt`):

```
IMGID:1015799
RT	O
@JayKenMinaj	B-PER
...
<blank line>
IMGID:1109405
...
```

Each tweet is an `IMGID:<id>` line, then one `token<TAB>tag` line per token; a blank line separates
tweets. The image of a tweet is `<image_dir>/<id>.jpg` (the images are distributed separately by the
dataset authors and are never downloaded here).

Usage (datasets 5.x runs no loading scripts, so the builder is used directly):

```python
from training_pmner.twitter_mner import load_twitter_mner

dataset = load_twitter_mner("twitter2017", data_dir="path/to/twitter2017", image_dir="path/to/images")
# or: builder = TwitterMNER(config_name="twitter2017", data_dir=..., image_dir=...)
#     builder.download_and_prepare(); dataset = builder.as_dataset()
```

Parquet export with embedded images and a dataset card, and the Hub push: `training_pmner/twitter_mner_hub.py`.

Data choices (deliberate; see `TwitterMNERConfig` for the switches):

- Tags are kept exactly as written. The original Twitter-2015 has entities that begin with `I-`
  (135 in test); they are not repaired, since seqeval's default mode scores them as entities.
- Twitter-2015's `OTHER` type is renamed `MISC` (`other_as_misc=True`, the default) so both
  datasets share `LABELS`, the order of the model's `id2label`.
- A token that is empty or whitespace only (Python `str.isspace`, e.g. a lone no-break space, once in
  Twitter-2015 valid) would vanish in any word-piece tokenizer and shift word alignment; by default
  it is replaced by `"_"` with a logged warning (`blank_token_policy="replace"`), or rejected
  (`"error"`). Other leading or trailing whitespace of a token is stripped, with a warning.
  Tokens made of invisible but non-whitespace characters (variation selectors, zero-width joiners,
  soft hyphens, a stray C1 control character), all tagged `O` in the real files, are kept as written.
- A line ending in `\\r\\n` is accepted (the `\\r` is dropped); a `\\r` anywhere else is rejected.
- Anything else that does not fit the format raises `TwitterMNERFormatError` naming file and line:
  a line without a tab, more than one tab, an unknown tag, tokens before any `IMGID:` line, an
  `IMGID:` with no id or an id containing whitespace or a path separator, an `IMGID:` with no
  tokens, a file with no tweets, undecodable bytes.
- Missing image files are not fatal: `image` is `None`, the count and a few examples are logged and
  kept in `TwitterMNER.split_stats`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import datasets
from datasets.builder import Key

from .context_files import file_sha256, read_context_file


logger = datasets.utils.logging.get_logger(__name__)

ENTITY_TYPES = ["PER", "LOC", "ORG", "MISC"]
"""Entity types of `LABELS`, in order."""

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
"""Tag names of the `ner_tags` ClassLabel; this order matches the P-MNER model's `id2label`."""

LABELS_WITH_OTHER = [label.replace("MISC", "OTHER") for label in LABELS]
"""Tag names for Twitter-2015 when `other_as_misc=False` (its original `OTHER` type)."""

SPLIT_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
"""File name of each split, as in the UMT repository."""

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/jefferyYu/UMT/master/data"
"""Public source of the text files: `<base_url>/<twitter2015|twitter2017>/<train|valid|test>.txt`."""

SOURCE_TYPES = {"twitter2015": ["PER", "LOC", "ORG", "OTHER"], "twitter2017": ["PER", "LOC", "ORG", "MISC"]}
"""Entity types as written in each dataset's files."""

_IMGID_PREFIX = "IMGID:"
_INVALID_IMAGE_ID = re.compile(r"[\s/\\]")
_MAX_EXAMPLES_IN_LOG = 5

_CITATION = """\
@inproceedings{zhang2018adaptive,
  title={Adaptive Co-attention Network for Named Entity Recognition in Tweets},
  author={Zhang, Qi and Fu, Jinlan and Liu, Xiaoyu and Huang, Xuanjing},
  booktitle={AAAI}, year={2018}}
@inproceedings{lu2018visual,
  title={Visual Attention Model for Name Tagging in Multimodal Social Media},
  author={Lu, Di and Neves, Leonardo and Carvalho, Vitor and Zhang, Ning and Ji, Heng},
  booktitle={ACL}, year={2018}}
@inproceedings{yu2020improving,
  title={Improving Multimodal Named Entity Recognition via Entity Span Detection with Unified Multimodal Transformer},
  author={Yu, Jianfei and Jiang, Jing and Yang, Li and Xia, Rui},
  booktitle={ACL}, year={2020}}
"""

_DESCRIPTION = """\
Twitter multimodal named entity recognition: tweets tokenized and tagged in BIO over PER, LOC, ORG and
MISC (Twitter-2015's OTHER, renamed), each paired with the image posted with it. Twitter-2015 (Zhang et
al., 2018) has 4000/1000/3257 tweets, Twitter-2017 (Lu et al., 2018) 3373/723/723 (train/validation/test),
as distributed with UMT (Yu et al., 2020). Tags are kept as written: the original Twitter-2015 has
entities starting with I- (seqeval's default mode scores them as entities). Using these data means
accepting the terms set by Twitter and the dataset providers.
"""

_HOMEPAGE = "https://github.com/jefferyYu/UMT"


def _source_hash() -> str:
    """Hash of this file, so that a change of the parsing code invalidates cached Arrow files."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class TwitterMNERFormatError(ValueError):
    """A Twitter MNER text file does not follow the format; the message names the file and line."""

    def __init__(self, path: str, line_number: int, reason: str, line: Optional[str] = None):
        self.path = path
        self.line_number = line_number
        self.reason = reason
        where = f"{path}, line {line_number}"
        message = f"{where}: {reason}" + (f" (line: {line!r})" if line is not None else "")
        super().__init__(message)


class TwitterMNERDownloadError(ConnectionError):
    """The text files could not be downloaded from their public source (e.g. offline)."""


@dataclass
class ParsedTweet:
    """One tweet as read from a file: its image id, tokens, source tags and the line of its `IMGID:`."""

    image_id: str
    tokens: list[str]
    tags: list[str]
    line_number: int


@dataclass
class TwitterMNERSplitStats:
    """What was read for one split.

    Attributes:
        file: the text file read.
        num_tweets: tweets read (equal to the number of `IMGID:` lines; all are yielded).
        num_tokens: token lines read.
        num_images: tweets whose image file was found (0 when no `image_dir` was given).
        num_missing_images: tweets whose image file was looked up and not found (or unreadable with
            `verify_images=True`); their `image` is `None`.
        missing_image_examples: up to five `"<image_id>: <path>"` of those.
        num_repaired_tokens: tokens changed by the whitespace rules (see the module docstring).
        repaired_token_examples: up to five `"<file>, line <n>: <what was done>"` of those.
        num_duplicate_image_ids: tweets whose `IMGID` was already seen in the same file (kept).
    """

    file: str
    num_tweets: int = 0
    num_tokens: int = 0
    num_images: int = 0
    num_missing_images: int = 0
    missing_image_examples: list[str] = field(default_factory=list)
    num_repaired_tokens: int = 0
    repaired_token_examples: list[str] = field(default_factory=list)
    num_duplicate_image_ids: int = 0


def _read_lines(path: str, encoding: str) -> list[str]:
    """The lines of `path`, split on `\\n` only (so that a stray `\\r` cannot split a line)."""
    data = Path(path).read_bytes()
    if encoding.replace("_", "-").lower() in ("utf-8", "utf8") and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line_number = data.count(b"\n", 0, err.start) + 1
        raise TwitterMNERFormatError(path, line_number, f"cannot decode bytes as {encoding}: {err.reason}") from err
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    return lines


def read_twitter_conll(
    path: str,
    allowed_tags: Sequence[str],
    *,
    blank_token_policy: str = "replace",
    blank_token_replacement: str = "_",
    encoding: str = "utf-8",
    stats: Optional[TwitterMNERSplitStats] = None,
) -> list[ParsedTweet]:
    """Reads one Twitter MNER text file strictly.

    Args:
        path: the file (`IMGID:<id>` line, `token<TAB>tag` lines, blank line between tweets).
        allowed_tags: every tag the file may use, as written (e.g. with `OTHER` for Twitter-2015).
        blank_token_policy: `"replace"` (an empty or whitespace-only token becomes
            `blank_token_replacement`, with a warning) or `"error"` (such a token is rejected).
        blank_token_replacement: the replacement token.
        encoding: the file's encoding (a UTF-8 byte order mark is dropped).
        stats: if given, token and repair counts are added to it.

    Returns:
        The tweets, in file order; tags as written.

    Raises:
        TwitterMNERFormatError: naming the file and the 1-based line number of the first problem.
    """
    if blank_token_policy not in ("replace", "error"):
        raise ValueError(f"blank_token_policy must be 'replace' or 'error', got {blank_token_policy!r}")
    if blank_token_policy == "replace" and (not blank_token_replacement or blank_token_replacement.isspace()):
        raise ValueError(f"blank_token_replacement must be a visible token, got {blank_token_replacement!r}")
    allowed = set(allowed_tags)
    stats = stats if stats is not None else TwitterMNERSplitStats(file=path)
    tweets: list[ParsedTweet] = []
    current: Optional[ParsedTweet] = None
    seen_ids: set[str] = set()
    num_imgid_lines = 0

    def close(tweet: Optional[ParsedTweet]) -> None:
        if tweet is None:
            return
        if not tweet.tokens:
            raise TwitterMNERFormatError(path, tweet.line_number, f"IMGID:{tweet.image_id} has no token lines")
        tweets.append(tweet)

    def repaired(line_number: int, what: str) -> None:
        stats.num_repaired_tokens += 1
        if len(stats.repaired_token_examples) < _MAX_EXAMPLES_IN_LOG:
            stats.repaired_token_examples.append(f"{path}, line {line_number}: {what}")

    for line_number, raw in enumerate(_read_lines(path, encoding), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if "\r" in line:
            raise TwitterMNERFormatError(path, line_number, "carriage return inside a line", raw)
        if "\t" not in line and line.strip() == "":
            close(current)  # tweet boundary (several blank lines in a row are accepted)
            current = None
            continue
        if line.startswith(_IMGID_PREFIX):
            image_id = line[len(_IMGID_PREFIX) :].strip()
            if not image_id or _INVALID_IMAGE_ID.search(image_id):
                raise TwitterMNERFormatError(
                    path, line_number, "IMGID: needs an image id without whitespace or path separators", raw
                )
            close(current)  # a missing blank line before IMGID: is tolerated
            num_imgid_lines += 1
            if image_id in seen_ids:
                stats.num_duplicate_image_ids += 1
                logger.warning(f"{path}, line {line_number}: image id {image_id} already used by an earlier tweet")
            seen_ids.add(image_id)
            current = ParsedTweet(image_id=image_id, tokens=[], tags=[], line_number=line_number)
            continue
        if "\t" not in line:
            raise TwitterMNERFormatError(path, line_number, "expected 'token<TAB>tag', found no tab", raw)
        token, _, tag = line.partition("\t")
        if "\t" in tag:
            raise TwitterMNERFormatError(path, line_number, "expected exactly one tab (a tab inside a token?)", raw)
        if current is None:
            what = "before any IMGID: line" if not tweets else "after a blank line, without an IMGID: line"
            raise TwitterMNERFormatError(path, line_number, f"token line {what}", raw)
        tag = tag.strip()
        if tag not in allowed:
            raise TwitterMNERFormatError(
                path, line_number, f"unknown tag {tag!r}; expected one of {sorted(allowed)}", raw
            )
        if token.strip() == "":
            if blank_token_policy == "error":
                raise TwitterMNERFormatError(
                    path, line_number, "empty or whitespace-only token (blank_token_policy='error')", raw
                )
            repaired(line_number, f"blank token {token!r} replaced by {blank_token_replacement!r}")
            token = blank_token_replacement
        elif token != token.strip():
            repaired(line_number, f"token {token!r} stripped of surrounding whitespace")
            token = token.strip()
        current.tokens.append(token)
        current.tags.append(tag)
        stats.num_tokens += 1
    close(current)

    if not tweets:
        raise TwitterMNERFormatError(path, 0, "no tweets found (empty file?)")
    if len(tweets) != num_imgid_lines:  # every IMGID: line must give exactly one tweet
        raise RuntimeError(f"{path}: read {num_imgid_lines} IMGID: lines but built {len(tweets)} tweets")
    stats.num_tweets = len(tweets)
    if stats.num_repaired_tokens:
        logger.warning(
            f"{path}: repaired {stats.num_repaired_tokens} token(s): " + "; ".join(stats.repaired_token_examples)
        )
    return tweets


@dataclass
class TwitterMNERConfig(datasets.BuilderConfig):
    """BuilderConfig for the Twitter MNER datasets.

    Args:
        name: `"twitter2015"` or `"twitter2017"`.
        data_dir (`str`, *optional*):
            Folder holding `train.txt`, `valid.txt` and `test.txt`, or a folder holding a `<name>/`
            subfolder with them (e.g. the UMT repository's `data/`). When not given, the files are
            downloaded from `base_url`.
        image_dir (`str`, *optional*):
            Folder of the tweet images, `<image_dir>/<IMGID><image_extension>`. When not given,
            `image` is `None` for every tweet. Missing files are counted and logged, not fatal.
        other_as_misc (`bool`, defaults to `True`):
            Twitter-2015 only: rename its `OTHER` type to `MISC`, so that its tag names are `LABELS`.
            With `False` its tag names are `LABELS_WITH_OTHER`. Twitter-2017 always uses `MISC`.
        image_extension (`str`, defaults to `".jpg"`):
            Extension of the image files.
        verify_images (`bool`, defaults to `False`):
            Open every found image with PIL (`Image.verify`) and treat an unreadable one as missing.
        blank_token_policy (`str`, defaults to `"replace"`):
            What to do with an empty or whitespace-only token: `"replace"` it by
            `blank_token_replacement` (with a warning) or raise an `"error"`.
        blank_token_replacement (`str`, defaults to `"_"`):
            Replacement for blank tokens; visible to every word-piece tokenizer.
        base_url (`str`, defaults to `DEFAULT_BASE_URL`):
            Where to download `<name>/<file>` from when no `data_dir` is given.
        encoding (`str`, defaults to `"utf-8"`):
            Encoding of the text files.
        context_file (`str`, *optional*):
            JSONL or Parquet file of auxiliary text per tweet (`context`, keyed by `id` or `image_id`; see
            `training_pmner/context_files.py`): adds a `context` column (`None` for tweets the file does not name).
    """

    image_dir: Optional[str] = None
    other_as_misc: bool = True
    image_extension: str = ".jpg"
    verify_images: bool = False
    blank_token_policy: str = "replace"
    blank_token_replacement: str = "_"
    base_url: str = DEFAULT_BASE_URL
    encoding: str = "utf-8"
    context_file: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.name not in SOURCE_TYPES:
            raise ValueError(f"Unknown Twitter MNER config {self.name!r}; choose one of {sorted(SOURCE_TYPES)}")
        check_flags(vars(self))

    @property
    def source_tags(self) -> list[str]:
        """Every tag the files of this dataset may contain, as written."""
        return ["O"] + [f"{prefix}-{kind}" for kind in SOURCE_TYPES[self.name] for prefix in ("B", "I")]

    @property
    def label_names(self) -> list[str]:
        """Names of the `ner_tags` ClassLabel."""
        if self.name == "twitter2015" and not self.other_as_misc:
            return list(LABELS_WITH_OTHER)
        return list(LABELS)

    def map_tag(self, tag: str) -> str:
        """A tag as written mapped to its `label_names` name (`OTHER` to `MISC` when configured)."""
        if self.name == "twitter2015" and self.other_as_misc and tag.endswith("-OTHER"):
            return tag[: -len("OTHER")] + "MISC"
        return tag


BOOLEAN_SETTINGS = ("other_as_misc", "verify_images")


def check_flags(settings: dict) -> None:
    """Boolean settings take booleans only: a string such as "no" would be taken as true."""
    for flag in BOOLEAN_SETTINGS:
        if flag in settings and not isinstance(settings[flag], bool):
            raise TypeError(f"{flag} must be True or False, got {settings[flag]!r}")


class TwitterMNER(datasets.GeneratorBasedBuilder):
    """Twitter-2015 / Twitter-2017 multimodal NER (tokens, BIO tags, image of the tweet).

    Features: `id` (`"<config>-<split>-<index>"`, the tweet's position in its file), `image_id`,
    `tokens`, `ner_tags` (ClassLabel over `config.label_names`), `image` (`datasets.Image()`, a lazily
    decoded path; `None` without `image_dir` or when the file is missing).

    After `download_and_prepare()` has generated a split (not when it was read from the cache),
    `split_stats[split]` holds its `TwitterMNERSplitStats`.
    """

    BUILDER_CONFIG_CLASS = TwitterMNERConfig
    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIGS = [
        TwitterMNERConfig(name="twitter2015", version=VERSION, description="Twitter-2015 (Zhang et al., 2018)."),
        TwitterMNERConfig(name="twitter2017", version=VERSION, description="Twitter-2017 (Lu et al., 2018)."),
    ]
    DEFAULT_CONFIG_NAME = "twitter2017"

    def __init__(self, *args, **kwargs):
        check_flags(kwargs)  # datasets sets config keywords as attributes, past the config's own checks
        # Absolute paths, so that the cache key does not depend on the working directory.
        for key in ("data_dir", "image_dir", "context_file"):
            if kwargs.get(key) is not None:
                kwargs[key] = os.path.abspath(os.path.expanduser(os.fspath(kwargs[key])))
        source_hash = _source_hash()
        if kwargs.get("context_file") is not None:  # a changed context file is a new dataset
            if not os.path.isfile(kwargs["context_file"]):
                raise FileNotFoundError(f"context_file={kwargs['context_file']!r} is not a file")
            source_hash += "-" + file_sha256(kwargs["context_file"])[:16]
        kwargs.setdefault("hash", source_hash)
        super().__init__(*args, **kwargs)
        self.split_stats: dict[str, TwitterMNERSplitStats] = {}
        self._parsed: dict[str, tuple[list[ParsedTweet], TwitterMNERSplitStats]] = {}
        self._contexts: Optional[tuple[dict, dict]] = None

    def _info(self) -> datasets.DatasetInfo:
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "image_id": datasets.Value("string"),
                "tokens": datasets.List(datasets.Value("string")),
                "ner_tags": datasets.List(datasets.ClassLabel(names=self.config.label_names)),
                "image": datasets.Image(),
                **({"context": datasets.Value("string")} if self.config.context_file else {}),
            }
        )
        return datasets.DatasetInfo(
            description=_DESCRIPTION, features=features, homepage=_HOMEPAGE, citation=_CITATION
        )

    def _resolve_local_files(self, data_dir: str) -> dict[str, str]:
        candidates = [data_dir, os.path.join(data_dir, self.config.name)]
        for folder in candidates:
            if all(os.path.isfile(os.path.join(folder, name)) for name in SPLIT_FILES.values()):
                return {split: os.path.join(folder, name) for split, name in SPLIT_FILES.items()}
        missing = [name for name in SPLIT_FILES.values() if not os.path.isfile(os.path.join(data_dir, name))]
        raise FileNotFoundError(
            f"data_dir={data_dir!r} must hold {', '.join(SPLIT_FILES.values())} for {self.config.name} "
            f"(directly or in a {self.config.name}/ subfolder); missing there: {', '.join(missing)}"
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        if self.config.data_dir:
            files = self._resolve_local_files(self.config.data_dir)
        else:
            base_url = self.config.base_url.rstrip("/")
            urls = {split: f"{base_url}/{self.config.name}/{name}" for split, name in SPLIT_FILES.items()}
            try:
                files = dl_manager.download(urls)
            except OSError as err:  # ConnectionError, FileNotFoundError from fsspec/HTTP, offline mode
                raise TwitterMNERDownloadError(
                    f"Could not download the {self.config.name} text files from {base_url}/{self.config.name}/ "
                    f"({type(err).__name__}: {err}). If you are offline, pass data_dir= pointing to a local "
                    f"folder with {', '.join(SPLIT_FILES.values())} (e.g. the UMT repository's "
                    f"data/{self.config.name})."
                ) from err
        if self.config.image_dir and not os.path.isdir(self.config.image_dir):
            raise FileNotFoundError(f"image_dir={self.config.image_dir!r} is not a folder")
        # Parse every file here, before any split is written: a format error is raised as is (naming
        # file and line) rather than wrapped in a DatasetGenerationError, and no split is half-built.
        self._contexts = read_context_file(self.config.context_file) if self.config.context_file else None
        self._parsed = {}
        for split in SPLIT_FILES:
            stats = TwitterMNERSplitStats(file=files[split])
            tweets = read_twitter_conll(
                files[split],
                self.config.source_tags,
                blank_token_policy=self.config.blank_token_policy,
                blank_token_replacement=self.config.blank_token_replacement,
                encoding=self.config.encoding,
                stats=stats,
            )
            self._parsed[files[split]] = (tweets, stats)
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"filepath": files[split], "split": split})
            for split in SPLIT_FILES
        ]

    def _generate_shards(self, filepath: str, split: str) -> Iterator[str]:
        yield filepath

    def _image_path(self, image_id: str) -> Optional[str]:
        path = os.path.join(self.config.image_dir, image_id + self.config.image_extension)
        if not os.path.isfile(path):
            return None
        if self.config.verify_images:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, UnidentifiedImageError, SyntaxError) as err:  # PIL's errors for bad files
                logger.warning(f"{path}: unreadable image ({type(err).__name__}: {err}); treated as missing")
                return None
        return path

    def _generate_examples(self, filepath: str, split: str) -> Iterator[tuple[Key, dict]]:
        tweets, stats = self._parsed[filepath]
        with_context = 0
        for index, tweet in enumerate(tweets):
            image = None
            if self.config.image_dir:
                image = self._image_path(tweet.image_id)
                if image is None:
                    stats.num_missing_images += 1
                    if len(stats.missing_image_examples) < _MAX_EXAMPLES_IN_LOG:
                        expected = os.path.join(self.config.image_dir, tweet.image_id + self.config.image_extension)
                        stats.missing_image_examples.append(f"{tweet.image_id}: {expected}")
                else:
                    stats.num_images += 1
            example = {
                "id": f"{self.config.name}-{split}-{index}",
                "image_id": tweet.image_id,
                "tokens": tweet.tokens,
                "ner_tags": [self.config.map_tag(tag) for tag in tweet.tags],
                "image": image,
            }
            if self._contexts is not None:
                by_id, by_image_id = self._contexts
                example["context"] = by_id.get(example["id"], by_image_id.get(tweet.image_id))
                with_context += example["context"] is not None
            yield Key(0, index), example
        if self._contexts is not None:
            logger.info(f"{self.config.name} {split}: {with_context} of {len(tweets)} tweets have a context in "
                        f"{self.config.context_file}")
        if stats.num_missing_images:
            logger.warning(
                f"{self.config.name} {split}: {stats.num_missing_images} of {stats.num_tweets} images missing "
                f"in {self.config.image_dir} (image is None for those tweets), e.g. "
                + "; ".join(stats.missing_image_examples)
            )
        logger.info(f"{self.config.name} {split}: {stats.num_tweets} tweets, {stats.num_tokens} tokens from {filepath}")
        self.split_stats[split] = stats


def load_twitter_mner(
    name: str = "twitter2017",
    data_dir: Optional[str] = None,
    image_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
    other_as_misc: bool = True,
    download_mode: Optional[Union[datasets.DownloadMode, str]] = None,
    **config_kwargs,
) -> datasets.DatasetDict:
    """Builds (or reads from the cache) one Twitter MNER dataset: `train`, `validation`, `test`.

    Args:
        name: `"twitter2015"` or `"twitter2017"`.
        data_dir: folder with `train.txt`, `valid.txt`, `test.txt` (or with a `<name>/` subfolder of
            them); downloaded from the UMT repository when not given (fails offline, asking for it).
        image_dir: folder of `<IMGID>.jpg` images; `image` is `None` without it or for a missing file.
        cache_dir: `datasets` cache folder (default: the `datasets` cache).
        other_as_misc: Twitter-2015: name its `OTHER` type `MISC` (see `TwitterMNERConfig`).
        download_mode: e.g. `"force_redownload"` to rebuild after images were added to `image_dir`.
        **config_kwargs: any other `TwitterMNERConfig` field (`verify_images`, `blank_token_policy`, ...).
    """
    builder = TwitterMNER(
        config_name=name,
        data_dir=data_dir,
        cache_dir=cache_dir,
        image_dir=image_dir,
        other_as_misc=other_as_misc,
        **config_kwargs,
    )
    builder.download_and_prepare(download_mode=download_mode)
    return builder.as_dataset()


def count_missing_images(dataset_dict: datasets.DatasetDict) -> dict[str, int]:
    """Per split, how many rows have no image (`image` is `None`); works on cached or exported data too."""
    counts = {}
    for split, dataset in dataset_dict.items():
        paths = dataset.cast_column("image", datasets.Image(decode=False))["image"]
        counts[split] = sum(1 for value in paths if value is None)
    return counts


__all__ = [
    "DEFAULT_BASE_URL",
    "ENTITY_TYPES",
    "LABELS",
    "LABELS_WITH_OTHER",
    "SPLIT_FILES",
    "ParsedTweet",
    "TwitterMNER",
    "TwitterMNERConfig",
    "TwitterMNERDownloadError",
    "TwitterMNERFormatError",
    "TwitterMNERSplitStats",
    "count_missing_images",
    "load_twitter_mner",
    "read_twitter_conll",
]
