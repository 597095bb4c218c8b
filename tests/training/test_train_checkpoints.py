"""Crashes and interruptions during `train_pmner.py`: a broken latest checkpoint gives way to the newest intact one,
a run with no intact checkpoint stops naming the files, a full disk while saving is one line and leaves no
half-written checkpoint that looks complete, and Ctrl-C is one line saying how to resume (exit 130)."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fixtures import PROJECT, write_training_workspace
from training_pmner.checkpoints import checkpoint_problems


ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_training_workspace(tmp_path_factory.mktemp("checkpoints"))


def command(workspace, output_dir, epochs="2", *extra):
    return [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"), "--dataset_name", "twitter2017",
        "--data_dir", str(workspace / "data"), "--text_only", "--text_model_name_or_path", str(workspace / "tiny-bert"),
        "--fusion_num_heads", "4", "--do_train", "--num_train_epochs", epochs, "--use_cpu", "--report_to", "none",
        "--output_dir", str(output_dir), *extra,
    ]


def run(workspace, args, **kwargs):
    env = dict(os.environ, HF_HOME=str(workspace / "hf-home"), **ENV)
    return subprocess.run(args, cwd=workspace, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def user_lines(stderr: str) -> list[str]:
    """The script's own lines (a progress bar left mid-line ends at its last carriage return)."""
    return [line.split("\r")[-1] for line in stderr.splitlines() if line.split("\r")[-1].startswith("train_pmner.py:")]


@pytest.fixture(scope="module")
def trained(workspace):
    output_dir = workspace / "trained"
    result = run(workspace, command(workspace, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert len(checkpoints) == 2 and not any(checkpoint_problems(str(path)) for path in checkpoints)
    return output_dir, checkpoints


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.pt", "config.json"])
def test_a_broken_latest_checkpoint_gives_way_to_the_newest_intact_one(workspace, trained, tmp_path, damage):
    output_dir = tmp_path / "run"
    shutil.copytree(trained[0], output_dir)
    latest = output_dir / trained[1][-1].name
    data = (latest / damage).read_bytes()
    (latest / damage).write_bytes(data[: len(data) // 2])  # as a crash or a full disk leaves it
    result = run(workspace, command(workspace, output_dir, "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in user_lines(result.stderr) if line.startswith("train_pmner.py: warning: skipping")]
    assert warning and f"{latest} ({damage} is" in warning[0] and str(output_dir / trained[1][0].name) in warning[0]
    assert "Traceback" not in result.stderr


def test_no_intact_checkpoint_stops_naming_the_files(workspace, trained, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(trained[0], output_dir)
    for checkpoint in trained[1]:
        os.remove(output_dir / checkpoint.name / "trainer_state.json")
    result = run(workspace, command(workspace, output_dir, "3"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = user_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("train_pmner.py: error: no intact checkpoint to resume from"), lines
    assert "trainer_state.json is missing" in lines[0]
    # an explicit --resume_from_checkpoint that is broken is refused, never replaced by another one
    broken = output_dir / trained[1][0].name
    result = run(workspace, command(workspace, tmp_path / "other", "3", "--resume_from_checkpoint", str(broken)))
    assert result.returncode == 2 and user_lines(result.stderr) == [
        f"train_pmner.py: error: --resume_from_checkpoint {broken} is broken: trainer_state.json is missing"
    ]


def test_a_full_disk_while_saving_is_one_line_and_sets_the_checkpoint_aside(workspace, tmp_path):
    output_dir = tmp_path / "full"
    limit = 200_000  # bytes per file: the optimizer state of the first checkpoint is larger

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run(workspace, command(workspace, output_dir, "1"), preexec_fn=small_files)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in user_lines(result.stderr) if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("train_pmner.py: error: no space left"), lines
    assert not list(output_dir.glob("checkpoint-*[0-9]")), "a half-written checkpoint is left under its own name"
    assert list(output_dir.glob("checkpoint-*.incomplete"))


def test_ctrl_c_is_one_line_saying_how_to_resume(workspace, tmp_path):
    output_dir = tmp_path / "interrupted"
    env = dict(os.environ, HF_HOME=str(workspace / "hf-home"), **ENV)
    # Ctrl-C as in a terminal: SIGINT handled by default even where the test runs in a background job, whose
    # children inherit SIGINT ignored; stdout is not read, so it must not fill a pipe
    process = subprocess.Popen(command(workspace, output_dir, "200"), cwd=workspace, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(output_dir.glob("checkpoint-*")):
            time.sleep(0.5)  # training is under way once the first checkpoint exists
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert user_lines(stderr) == [
        f"train_pmner.py: interrupted; run the same command again to resume from the last checkpoint in {output_dir}"
    ]
    # whatever the interruption cut short (a checkpoint being saved is set aside), the folder runs on
    assert not any(checkpoint_problems(str(path)) for path in output_dir.glob("checkpoint-*[0-9]"))
    again = run(workspace, command(workspace, output_dir, "1"))
    assert again.returncode == 0 and not [line for line in user_lines(again.stderr) if "error" in line], again.stderr[-2000:]
