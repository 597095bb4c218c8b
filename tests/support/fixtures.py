"""Small offline fixtures shared by the tests: a tiny BERT masked LM with its tokenizer, a tiny Twitter MNER
data set (CoNLL text plus generated images), a fresh Python process that cannot import this project, and the
environment and stderr reading of a command run as a user runs it."""

import os
import random
import re
import subprocess
import sys
import textwrap

from PIL import Image
from transformers import BertConfig, BertForMaskedLM, BertTokenizer


PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/support/ -> the repository
PROJECT_MODULES = ("modeling_pmner", "processing_pmner", "predict_pmner", "training_pmner", "train_pmner")

ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
PROGRESS_BAR = re.compile(r"\[\d+:\d+[<,\]]|it/s\]|s/it\]|examples/s\]")


def stderr_lines(text: str) -> list[str]:
    """The lines of stderr a user reads: progress bars (carriage-return updates) left out."""
    lines = []
    for line in text.splitlines():
        line = line.split("\r")[-1]
        if line.strip() and not PROGRESS_BAR.search(line):
            lines.append(line)
    return lines


PEOPLE = ["trump", "obama", "kawhi", "leonard"]
PLACES = ["london", "paris", "york"]
ORGS = ["nba", "apple", "google"]
FILLER = ["rt", "@user", ":", "new", "festival", "vote", "year", "the", "!", "#", "today", "visits", "meets", "in", "at"]
WORDS = sorted(
    set(PEOPLE + PLACES + ORGS + FILLER)
    | set("the word of is none begin inside end single person location organization miscellaneous other".split())
    | set(", . ? a b c d e f g h i j k l m n o p q r s t u v w x y z".split())
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"##{letter}" for letter in "abcdefghijklmnopqrstuvwxyz"]

TINY_BERT = dict(
    vocab_size=len(VOCAB),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=128,
)


def write_tiny_tokenizer(folder) -> BertTokenizer:
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_tiny_masked_lm(folder, seed: int = 0) -> str:
    """A BERT masked LM of hidden size 32 and its tokenizer, saved like a Hub checkpoint."""
    import torch

    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig(**TINY_BERT)).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return str(folder)


def write_unrebuildable_weights(path, builder: str = "resnet18", seed: int = 0, **builder_kwargs) -> str:
    """A torchvision model's weights that no setting can rebuild: drawn from `seed`, then every floating tensor
    perturbed by noise from another generator, saved as safetensors at `path`. A processor built from this file
    and saved, with the file then deleted, can only give its features by reading the folder's own weights file."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(builder, weights=None, **builder_kwargs)
    noise = torch.Generator().manual_seed(10_000 + seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            tensor = tensor + 0.05 * tensor.std().nan_to_num(1.0) * torch.randn(tensor.shape, generator=noise)
        state[name] = tensor.contiguous()
    save_file(state, str(path))
    return str(path)


def make_tweet(rng: random.Random) -> tuple[list[str], list[str]]:
    """A tweet with a learnable pattern: '<PER> visits <LOC>' or 'rt @user : <ORG> meets <PER> today'."""
    if rng.random() < 0.5:
        tokens = [rng.choice(PEOPLE), "visits", rng.choice(PLACES), rng.choice(["today", "!", "#"])]
        tags = ["B-PER", "O", "B-LOC", "O"]
    else:
        tokens = ["rt", "@user", ":", rng.choice(ORGS), "meets", rng.choice(PEOPLE), rng.choice(PEOPLE)]
        tags = ["O", "O", "O", "B-ORG", "O", "B-PER", "I-PER"]
    if rng.random() < 0.3:
        tokens += ["festival", "of", "the", "year"]
        tags += ["B-MISC", "I-MISC", "I-MISC", "I-MISC"]
    return tokens, tags


def write_twitter_fixture(data_dir, image_dir=None, sizes=(40, 12, 12), seed: int = 0, missing_images=()) -> None:
    """train/valid/test.txt in the benchmark's CoNLL format and one generated JPEG per tweet (except
    `missing_images`)."""
    rng = random.Random(seed)
    os.makedirs(data_dir, exist_ok=True)
    if image_dir is not None:
        os.makedirs(image_dir, exist_ok=True)
    for split, size in zip(("train", "valid", "test"), sizes):
        lines = []
        for index in range(size):
            image_id = f"{split}_{index}"
            tokens, tags = make_tweet(rng)
            lines.append(f"IMGID:{image_id}")
            lines += [f"{token}\t{tag}" for token, tag in zip(tokens, tags)]
            lines.append("")
            if image_dir is not None and image_id not in missing_images:
                color = tuple(rng.randrange(256) for _ in range(3))
                image = Image.new("RGB", (rng.randrange(48, 96), rng.randrange(48, 96)), color)
                image.save(os.path.join(image_dir, f"{image_id}.jpg"))
        with open(os.path.join(data_dir, f"{split}.txt"), "w") as handle:
            handle.write("\n".join(lines) + "\n")


_WITHOUT_PROJECT = """
import sys as _sys
_sys.meta_path[:] = [f for f in _sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
_sys.path[:] = [p for p in _sys.path if p not in ("", ".", {project!r})]
_sys.path_hooks[:] = [h for h in _sys.path_hooks if "editable" not in repr(h).lower()]
_sys.path_importer_cache.clear()
for _name in {modules!r}:
    try:
        __import__(_name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the project ({{_name}}) is importable in the remote-code process")
"""


def write_training_workspace(root, sizes=(16, 4, 4), with_images: bool = False):
    """A folder for train_pmner.py runs: a tiny masked LM in `tiny-bert`, Twitter-format CoNLL files of `sizes`
    tweets in `data` and, `with_images`, their images in `images`. Returns `root`."""
    write_tiny_masked_lm(os.path.join(root, "tiny-bert"))
    images = os.path.join(root, "images") if with_images else None
    write_twitter_fixture(os.path.join(root, "data"), images, sizes=sizes)
    return root


def run_without_project(script: str, cwd, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh Python that cannot import this project, like a Hub user's process loading a saved
    folder with `trust_remote_code=True`: the editable-install finder, the project folder and PYTHONPATH are removed
    first, and the process exits with an error if a project module can still be imported. Offline, with its own
    HF_HOME under `cwd` (so no modules cached by an earlier run are reused). `env` is applied last: e.g.
    `{"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": ...}` for a process that talks to a test Hub."""
    extra = env
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        PYTHONNOUSERSITE="1",
        HF_HOME=os.path.join(str(cwd), "hf-home"),
    )
    env.update(extra or {})
    prelude = _WITHOUT_PROJECT.format(project=PROJECT, modules=PROJECT_MODULES)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
