"""Pytest fixtures shared by the test folders: `hub_server`, a real-HTTP Hub on 127.0.0.1 (support/hub_server.py).

The test folders follow the packages (modeling/, processing/, predict/, training/, app/, benchmarks/); what several
of them share (tiny models, tokenizers, builders, the Hub server, a folder saved by older code) is in support/."""

import os
import secrets
import sys
from dataclasses import dataclass

import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_TESTS, "support"))

from hub_server import HubServer  # noqa: E402


@dataclass
class RunningHub:
    """A started `HubServer` with one user and a write token, and the environment a process needs to use it."""

    server: HubServer
    url: str
    user: str
    token: str
    home: str  # an empty HF_HOME

    def env(self, token: bool = True) -> dict:
        """Variables for a subprocess talking to this Hub (online, no Xet, an empty HF_HOME); with `token=False`
        the process has no credentials at all (no HF_TOKEN, and no token file in its HF_HOME)."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": self.home,
            "HF_HUB_CACHE": os.path.join(self.home, "hub"),
            "HF_DATASETS_CACHE": os.path.join(self.home, "datasets"),
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if token:
            env["HF_TOKEN"] = self.token
        return env

    def api(self, token: bool = True):
        """An `HfApi` for this Hub in the test process itself (the fixture has turned Xet off there)."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.url, token=self.token if token else False)

    def process_env(self, token: bool = True) -> dict:
        """`os.environ` without PYTHONPATH or any HF_TOKEN, plus `env(token)`: for `subprocess.run(env=...)`."""
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(self.env(token))
        return env


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where torch sees no CUDA device."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture
def hub_server(tmp_path_factory, monkeypatch):
    """A Hub on 127.0.0.1 (free ports) storing its files in a temp folder; stopped after the test. In this process,
    for the test's duration, `RunningHub.api()` can reach it although CI runs with `HF_HUB_OFFLINE=1`, and uploads
    use the LFS protocol (`HF_HUB_OFFLINE` and `HF_HUB_DISABLE_XET`, read by huggingface_hub at import, are patched);
    subprocesses get the variables from `RunningHub.env()` / `process_env()`."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    root = tmp_path_factory.mktemp("hub")
    user, token = "user", "hf_test_" + secrets.token_hex(8)
    home = tmp_path_factory.mktemp("hf-home")
    server = HubServer(str(root / "store"), tokens={token: user}).start()
    try:
        yield RunningHub(server=server, url=server.url, user=user, token=token, home=str(home))
    finally:
        server.stop()
