"""The auxiliary context of `train_pmner.py` (beyond the paper): a `context` column of every split, filled by
retrieval (`--retrieval_context K`: each tweet's K nearest training tweets, gold entities marked) or read from a file
(`--context_file`, by the dataset builder), and the record of it that the processor saves (`context_source`), which
the model card and the pipeline read.

Retrieval runs on the splits as `datasets` columns, so both steps are cached under a fingerprint: the embeddings of
a split under (split, encoder), the contexts under (split, training split, encoder, K). A validation or test tweet
retrieves from the training split only; a training tweet never retrieves itself or a tweet with its text.
"""

import json
import logging
import os

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher

from processing_pmner.text_retrieval_context import RetrievalIndex, SentenceEncoder

from .errors import ArgumentsError


logger = logging.getLogger(__name__)

EMBEDDING_COLUMN = "retrieval_embedding"
CONTEXT_VERSION = 1


def prepare_context(raw: datasets.DatasetDict, data_args, processor, text_model: str, trained_folder: bool, device,
                    text_model_name: str | None = None):
    """Adds the `context` column (where the run has context) and sets `processor.context_source`. Returns the
    retrieval index to save with the model (`None` without retrieval). `text_model_name`: the text model as given
    (e.g. `offline-minilm`), the default retrieval encoder; `text_model` is its resolved path."""
    saved = processor.context_source if trained_folder else None
    has_column = "context" in raw["train"].column_names
    if trained_folder and saved and saved.get("kind") == "retrieval":
        if data_args.retrieval_context and data_args.retrieval_context != saved.get("k"):
            raise ArgumentsError(
                f"{text_model} was trained with --retrieval_context {saved.get('k')}; this run asks for "
                f"{data_args.retrieval_context}: a trained folder keeps its retrieval (start from a masked LM to change it)"
            )
        index = RetrievalIndex.from_pretrained(text_model)
        logger.info(f"Retrieval context from the index saved in {text_model} (k={index.k}, {len(index)} tweets)")
        add_retrieved_context(raw, index, device, trained_here=False)
        return index
    if trained_folder and saved and data_args.retrieval_context:  # saved kind "column": context from a file
        raise ArgumentsError(
            f"{text_model} was trained with {describe(saved)}; --retrieval_context {data_args.retrieval_context} would "
            "give it another kind of context: the model expects at inference what it was trained with"
        )
    if trained_folder and bool(saved) != bool(data_args.retrieval_context or has_column):
        raise ArgumentsError(
            f"{text_model} was trained with {describe(saved)}, but this run gives "
            f"{'a context column' if has_column else 'no context'}: the model expects at inference what it was trained with"
        )
    if data_args.retrieval_context:
        if has_column:
            raise ArgumentsError(
                f"--dataset_name {data_args.dataset_name!r} already has a 'context' column: --retrieval_context would "
                "replace it; drop one of them"
            )
        name = data_args.retrieval_encoder or text_model_name or text_model
        # the default encoder is read from the text model's own folder (a Hub model's snapshot, fetched once with
        # --model_revision, --cache_dir and --token)
        source = resolve_encoder(data_args.retrieval_encoder) if data_args.retrieval_encoder else text_model
        try:
            encoder = SentenceEncoder.from_pretrained(source)
        except (OSError, ImportError) as error:
            given = "--retrieval_encoder" if data_args.retrieval_encoder else "--text_model_name_or_path (the default encoder)"
            raise ArgumentsError(f"{given} {name!r}: {error}") from error
        encoder.name = hub_name(name)
        index = build_training_index(raw, encoder, data_args.retrieval_context, device)
        add_retrieved_context(raw, index, device, trained_here=True)
        processor.context_source = {
            "kind": "retrieval",
            "k": index.k,
            "encoder": encoder.name,
            "index": "retrieval_index.json",
            "embeddings_sha256": index.record()["embeddings_sha256"],  # ties the saved index to this model
            "description": f"the {index.k} nearest training tweets (by {encoder.name} mean-pooled embeddings), their "
            "gold entities marked",
        }
        return index
    if has_column and not trained_folder:
        description = data_args.context_description or (
            f"the 'context' field of {os.path.basename(data_args.context_file)}" if data_args.context_file
            else f"the 'context' column of {data_args.dataset_name}"
        )
        processor.context_source = {"kind": "column", "description": description}
        filled = {split: sum(1 for text in raw[split]["context"] if text) for split in raw}
        logger.info(f"Auxiliary context ({description}); tweets with context: {filled}")
    return None


def context_identity(source: dict | None) -> dict | None:
    """What makes a model's context another kind of input: none, retrieval (k, encoder) or a context column."""
    if not source:
        return None
    if source.get("kind") == "retrieval":
        return {"kind": "retrieval", "k": source.get("k"), "encoder": source.get("encoder")}
    return {"kind": source.get("kind")}


def check_same_context(checkpoint: str, context_source: dict | None) -> None:
    """Refuses to resume from `checkpoint` when it was trained with another context than this run gives (the
    Trainer would go on training it on other input). A checkpoint without a processor file is not checked."""
    path = os.path.join(checkpoint, "processor_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        saved = json.load(handle).get("context_source")
    if context_identity(saved) != context_identity(context_source):
        raise ArgumentsError(
            f"checkpoint {checkpoint} was trained with {describe(saved)}; this run gives {describe(context_source)} (use the same context arguments, or "
            "another --output_dir to start over)"
        )


def describe(source: dict | None) -> str:
    if not source:
        return "no context"
    if source.get("kind") == "retrieval":
        return f"retrieval context (k={source.get('k')}, encoder {source.get('encoder')})"
    return f"auxiliary context ({source.get('description')})"


def resolve_encoder(name: str) -> str:
    from .data import resolve_text_model

    return resolve_text_model(name)


def hub_name(name: str) -> str:
    """How the encoder is named in records and cards: the Hub id of the offline MiniLM, else as given."""
    from .data import hub_id_of_text_model

    return hub_id_of_text_model(name) or name


def embed_split(split: datasets.Dataset, encoder: SentenceEncoder, device) -> datasets.Dataset:
    """The split with an `EMBEDDING_COLUMN` (cached by `datasets` under split and encoder); a split that has it
    already is returned as it is."""
    if EMBEDDING_COLUMN in split.column_names:
        return split

    def embed(batch):
        return {EMBEDDING_COLUMN: encoder.encode([" ".join(words) for words in batch["tokens"]], device=device).numpy()}

    return split.map(
        embed,
        batched=True,
        batch_size=256,
        new_fingerprint=Hasher.hash([split._fingerprint, encoder.identity, "embedding", CONTEXT_VERSION]),
        desc="Embedding tweets for retrieval",
    )


def build_training_index(raw: datasets.DatasetDict, encoder: SentenceEncoder, k: int, device) -> RetrievalIndex:
    """The index over the training split; `raw["train"]` keeps its embeddings for `add_retrieved_context`."""
    fingerprint = Hasher.hash([raw["train"]._fingerprint, encoder.identity, k, CONTEXT_VERSION])
    train = raw["train"] = embed_split(raw["train"], encoder, device)
    names = train.features["ner_tags"].feature.names
    tags = [[names[tag] for tag in sentence] for sentence in train["ner_tags"]]
    embeddings = as_matrix(train.with_format("numpy", columns=[EMBEDDING_COLUMN])[EMBEDDING_COLUMN])
    index = RetrievalIndex.build(encoder, train["tokens"], tags, k, embeddings=embeddings)
    index.fingerprint = fingerprint
    return index


def as_matrix(column) -> torch.Tensor:
    """(rows, hidden) float32 from a `datasets` column of vectors (an array, a list of arrays, a Column)."""
    return torch.as_tensor(np.asarray([np.asarray(row, dtype=np.float32) for row in column]).reshape(len(column), -1))


def add_retrieved_context(raw: datasets.DatasetDict, index: RetrievalIndex, device, trained_here: bool) -> None:
    """Adds the `context` column to every split, in place. With `trained_here`, the training split is the index
    itself: each tweet's own row is excluded too (identical texts are excluded for every query)."""
    fingerprint = getattr(index, "fingerprint", None) or Hasher.hash(
        [index.record(), index.texts, index.keys, index.encoder.identity, CONTEXT_VERSION]  # texts: rendered gold
    )
    for name in list(raw):
        split = embed_split(raw[name], index.encoder, device)
        own = trained_here and name == "train"

        def retrieve(batch, indices):
            embeddings = as_matrix(batch[EMBEDDING_COLUMN])
            rows = list(indices) if own else None
            return {"context": index.contexts(batch["tokens"], own_rows=rows, embeddings=embeddings)}

        raw[name] = split.with_format("numpy", columns=[EMBEDDING_COLUMN], output_all_columns=True).map(
            retrieve,
            batched=True,
            batch_size=512,
            with_indices=True,
            remove_columns=[EMBEDDING_COLUMN],
            new_fingerprint=Hasher.hash([split._fingerprint, fingerprint, own, "context", CONTEXT_VERSION]),
            desc=f"Retrieving {index.k} training tweets per {name} tweet",
        ).with_format(None)
    examples = raw["validation"][0]
    logger.info(f"Retrieval context, e.g. validation tweet {' '.join(examples['tokens'])!r} -> {examples['context']!r}")


__all__ = ["check_same_context", "prepare_context"]
