"""Retrieval-augmented context (beyond the paper): each tweet's k nearest training tweets, with their gold entities
marked, as the auxiliary context of the processor (the second text of the pair).

- [`SentenceEncoder`]: any transformers encoder with mean pooling over the attention mask and L2 normalisation (the
  sentence-transformers recipe; the offline MiniLM is such a model).
- [`RetrievalIndex`]: the training tweets' embeddings, their rendered text ("Kawhi Leonard (person) wins ...") and
  their normalised text. Search is exact (a matrix product, in chunks of queries; `faiss-cpu`'s flat inner-product
  index when `backend="faiss"`, for millions). A query never retrieves a training tweet with the same text (itself
  included: comparison is on the casefolded, whitespace-normalised words), nor the index row given as its own.
- Saved beside the model: `retrieval_index.safetensors` (embeddings), `retrieval_index.json` (texts, k, encoder
  record) and the encoder in `retrieval_encoder/`, so a model folder or Hub repo retrieves with nothing else.

This file is copied flat into saved processor folders (remote code): it imports siblings only relatively.
"""

import hashlib
import json
import os

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import cached_file

from .image_frr_models import tensors_sha256


try:
    from safetensors.torch import load_file as safetensors_load_file
    from safetensors.torch import save_file as safetensors_save_file
except ImportError:  # pragma: no cover - transformers depends on safetensors
    safetensors_load_file = safetensors_save_file = None


INDEX_WEIGHTS = "retrieval_index.safetensors"
INDEX_RECORD = "retrieval_index.json"
ENCODER_FOLDER = "retrieval_encoder"
SEPARATOR = " ; "
INDEX_FORMAT = 1
ENTITY_WORDS = {"PER": "person", "LOC": "location", "ORG": "organization", "MISC": "miscellaneous", "OTHER": "other"}
BACKENDS = ("exact", "faiss")


def text_key(words) -> str:
    """What "identical text" means: the words, casefolded, single-spaced."""
    if isinstance(words, str):
        words = words.split()
    return " ".join(word.casefold() for word in words)


def render_with_entities(words: list[str], tags: list[str]) -> str:
    """The tweet with each gold entity followed by its type: "Kawhi Leonard (person) wins the MVP (miscellaneous)".
    `tags` are BIO or BIOES strings, one per word."""
    if len(words) != len(tags):
        raise ValueError(f"{len(words)} words but {len(tags)} tags")
    out, open_type = [], None
    for word, tag in zip(words, tags):
        prefix, _, entity = tag.partition("-")
        starts = prefix in ("B", "S") or (prefix in ("I", "E") and entity != open_type)
        if open_type is not None and (tag == "O" or starts):
            out.append(f"({ENTITY_WORDS.get(open_type, open_type.lower())})")
            open_type = None
        out.append(word)
        if tag != "O":
            open_type = entity
            if prefix in ("E", "S"):
                out.append(f"({ENTITY_WORDS.get(entity, entity.lower())})")
                open_type = None
    if open_type is not None:
        out.append(f"({ENTITY_WORDS.get(open_type, open_type.lower())})")
    return " ".join(out)


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from any transformers encoder (`AutoModel`)."""

    def __init__(self, model, tokenizer, name: str, max_length: int = 128, batch_size: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self._identity = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, subfolder: str = "", **hub_kwargs) -> "SentenceEncoder":
        kwargs = dict(hub_kwargs, subfolder=subfolder) if subfolder else dict(hub_kwargs)
        try:
            model = AutoModel.from_pretrained(name_or_path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as error:
            where = f"{name_or_path}/{subfolder}" if subfolder else name_or_path
            raise OSError(f"cannot load the retrieval encoder {where}: {error}") from error
        return cls(model, tokenizer, name=name_or_path)

    @property
    def identity(self) -> str:
        """sha256 of the encoder's weights and its tokenizer: what cached embeddings depend on."""
        if self._identity is None:
            digest = hashlib.sha256(tensors_sha256(self.model.state_dict()).encode())
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None:  # its truncation and padding state changes with every call: not part of it
                spec = {key: value for key, value in json.loads(backend.to_str()).items() if key not in ("truncation", "padding")}
            else:
                spec = self.tokenizer.get_vocab()
            digest.update(json.dumps(spec, sort_keys=True).encode())
            digest.update(str(self.max_length).encode())
            self._identity = digest.hexdigest()
        return self._identity

    @torch.no_grad()
    def encode(self, texts: list[str], device=None) -> torch.Tensor:
        """(len(texts), hidden) float32 embeddings, each of norm 1 (an empty text gives a zero vector)."""
        device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.model.to(device)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = [text if text.strip() else self.tokenizer.unk_token or "" for text in texts[start : start + self.batch_size]]
            encoding = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(device)
            hidden = self.model(**encoding).last_hidden_state  # (batch, length, hidden)
            mask = encoding["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, length, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean pooling (batch, hidden)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        hidden_size = self.model.config.hidden_size
        return torch.cat(chunks) if chunks else torch.zeros(0, hidden_size)

    def save_pretrained(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


class RetrievalIndex:
    """The training tweets to retrieve from (see the module docstring)."""

    def __init__(self, encoder: SentenceEncoder, embeddings: torch.Tensor, texts: list[str], keys: list[str], k: int,
                 backend: str = "exact"):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not (embeddings.shape[0] == len(texts) == len(keys)):
            raise ValueError(f"{embeddings.shape[0]} embeddings for {len(texts)} texts and {len(keys)} keys")
        self.encoder = encoder
        self.embeddings = embeddings.float()  # (N, hidden)
        self.texts = list(texts)
        self.keys = list(keys)
        self.k = int(k)
        self.backend = backend
        self._by_key = {}
        for row, key in enumerate(self.keys):
            self._by_key.setdefault(key, []).append(row)
        self._faiss = None

    @classmethod
    def build(cls, encoder: SentenceEncoder, tokens: list[list[str]], tags: list[list[str]], k: int,
              embeddings: torch.Tensor | None = None, **kwargs) -> "RetrievalIndex":
        """An index over training tweets (`tokens`, their gold `tags`); `embeddings` when already computed."""
        if embeddings is None:
            embeddings = encoder.encode([" ".join(words) for words in tokens])
        texts = [render_with_entities(words, row_tags) for words, row_tags in zip(tokens, tags)]
        return cls(encoder, torch.as_tensor(embeddings), texts, [text_key(words) for words in tokens], k, **kwargs)

    def __len__(self) -> int:
        return len(self.texts)

    def search(self, queries: torch.Tensor, query_keys: list[str], own_rows: list | None = None,
               chunk_size: int = 256) -> list[list[int]]:
        """Per query, the rows of its k nearest training tweets, best first, never one with the query's text nor
        its own row (`own_rows[i]`: the index row of query i when it is a training tweet, else `None`)."""
        queries = torch.as_tensor(queries).float()  # (Q, hidden)
        own_rows = own_rows if own_rows is not None else [None] * len(query_keys)
        if not (queries.shape[0] == len(query_keys) == len(own_rows)):
            raise ValueError(f"{queries.shape[0]} query embeddings for {len(query_keys)} keys")
        if self.backend == "faiss":
            return self._search_faiss(queries, query_keys, own_rows)
        results = []
        for start in range(0, queries.shape[0], chunk_size):
            scores = queries[start : start + chunk_size] @ self.embeddings.T  # cosine similarity (chunk, N)
            for offset in range(scores.shape[0]):
                excluded = self._excluded(query_keys[start + offset], own_rows[start + offset])
                if excluded:
                    scores[offset, excluded] = float("-inf")
            count = min(self.k, scores.shape[1])
            values, rows = scores.topk(count, dim=1) if count else (scores[:, :0], scores[:, :0].long())
            results += [[int(r) for r, v in zip(row, value) if v != float("-inf")] for row, value in zip(rows, values)]
        return results

    def _excluded(self, key: str, own_row) -> list[int]:
        rows = list(self._by_key.get(key, ()))
        if own_row is not None and own_row not in rows:
            rows.append(int(own_row))
        return rows

    def _search_faiss(self, queries, query_keys, own_rows) -> list[list[int]]:
        try:
            import faiss
        except ImportError as error:
            raise ImportError("backend='faiss' needs faiss-cpu: pip install faiss-cpu") from error
        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(self.embeddings.shape[1])  # exact inner product
            self._faiss.add(self.embeddings.numpy())
        # enough candidates that k remain after dropping the query's own text and row
        most_excluded = max((len(rows) for rows in self._by_key.values()), default=0) + 1
        depth = min(self.k + most_excluded, len(self))
        _, candidates = self._faiss.search(queries.numpy(), depth)
        results = []
        for key, own_row, row in zip(query_keys, own_rows, candidates.tolist()):
            excluded = set(self._excluded(key, own_row))
            results.append([r for r in row if r >= 0 and r not in excluded][: self.k])
        return results

    def render(self, neighbours: list[int]) -> str:
        return SEPARATOR.join(self.texts[row] for row in neighbours)

    def contexts(self, sentences: list, own_rows: list | None = None, embeddings: torch.Tensor | None = None,
                 device=None) -> list[str]:
        """The retrieved context of each sentence (a list of words or a string)."""
        words = [sentence.split() if isinstance(sentence, str) else list(sentence) for sentence in sentences]
        if embeddings is None:
            embeddings = self.encoder.encode([" ".join(sentence) for sentence in words], device=device)
        neighbours = self.search(embeddings, [text_key(sentence) for sentence in words], own_rows)
        return [self.render(rows) for rows in neighbours]

    # -- saving and loading ------------------------------------------------------------------------------------

    def record(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "k": self.k,
            "size": len(self),
            "separator": SEPARATOR,
            "encoder": {"name": self.encoder.name, "folder": ENCODER_FOLDER, "sha256": self.encoder.identity},
            "embeddings_sha256": tensors_sha256({"embeddings": self.embeddings}),
        }

    def save_pretrained(self, folder: str) -> list[str]:
        """Writes the index and its encoder into `folder`; returns the paths written (relative to it)."""
        os.makedirs(folder, exist_ok=True)
        record = dict(self.record(), texts=self.texts, keys=self.keys)
        safetensors_save_file({"embeddings": self.embeddings.contiguous()}, os.path.join(folder, INDEX_WEIGHTS))
        with open(os.path.join(folder, INDEX_RECORD), "w") as handle:
            json.dump(record, handle, ensure_ascii=False)
        self.encoder.save_pretrained(os.path.join(folder, ENCODER_FOLDER))
        return [INDEX_WEIGHTS, INDEX_RECORD] + sorted(
            f"{ENCODER_FOLDER}/{name}" for name in os.listdir(os.path.join(folder, ENCODER_FOLDER))
        )

    @classmethod
    def from_pretrained(cls, path_or_repo: str, backend: str = "exact", **hub_kwargs) -> "RetrievalIndex":
        """The index saved in a model folder, a Hub repo, or a folder of its own."""
        hub_kwargs = {key: value for key, value in hub_kwargs.items() if value is not None}
        try:
            record_path = cached_file(path_or_repo, INDEX_RECORD, **hub_kwargs)
            weights_path = cached_file(path_or_repo, INDEX_WEIGHTS, **hub_kwargs)
        except OSError as error:
            raise OSError(f"{path_or_repo} has no retrieval index ({INDEX_RECORD}, {INDEX_WEIGHTS}): {error}") from error
        try:
            with open(record_path) as handle:
                record = json.load(handle)
            embeddings = safetensors_load_file(weights_path)["embeddings"]
        except Exception as error:  # json / safetensors errors, re-raised naming the file
            raise OSError(f"the retrieval index of {path_or_repo} could not be read: {error}") from error
        if record.get("format") != INDEX_FORMAT:
            raise ValueError(f"{record_path}: retrieval index format {record.get('format')!r}, expected {INDEX_FORMAT}")
        if tensors_sha256({"embeddings": embeddings}) != record.get("embeddings_sha256"):
            raise ValueError(f"{weights_path} does not match the checksum in {record_path}: save the index again")
        encoder = SentenceEncoder.from_pretrained(path_or_repo, subfolder=record["encoder"]["folder"], **hub_kwargs)
        encoder.name = record["encoder"]["name"]
        if encoder.identity != record["encoder"]["sha256"]:
            raise ValueError(
                f"the retrieval encoder in {path_or_repo}/{ENCODER_FOLDER} is not the one the index was built with "
                "(sha256 differs): save the index again"
            )
        return cls(encoder, embeddings, record["texts"], record["keys"], record["k"], backend=backend)
