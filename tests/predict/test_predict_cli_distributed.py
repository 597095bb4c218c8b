"""`pmner-predict` under `torchrun`: the input is split between processes and process 0 writes the output of a
single-process run, byte for byte."""

import json
import os
import subprocess
import sys

import pytest

from fixtures import PROJECT
from pipeline_builders import build_model, build_processor, save_folder
from predict_cli_runner import ENV, run_cli, write

from predict_pmner import cli as predict_cli
from predict_pmner.cli import Processes, UsageError, main


def torchrun(arguments, tmp_path, processes: int = 2) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "torchrun")  # the venv's torchrun
    launcher = [script] if os.path.isfile(script) else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", **ENV)
    return subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node", str(processes), "-m", "predict_pmner.cli",
         *map(str, arguments), "--device", "cpu", "--no-progress"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def random_model(workspace):
    """A model with random weights: varied tags and scores (written in full), so a tweet out of place shows."""
    text_model = str(workspace["root"] / "tiny-bert")
    model = build_model(text_model, seed=3)
    return save_folder(workspace["root"] / "random-model", model, build_processor(text_model, model))


def test_two_processes_write_the_single_process_output(workspace, random_model, tmp_path, capsys):
    lines = [json.dumps({"id": index, "text": f"tweet number {index} about london and @nba " * (1 + index % 4)})
             for index in range(9)]
    lines[3] = '{"id": 3, "text": "no closing brace"'
    lines[6] = json.dumps({"id": 6, "text": "a picture", "image": "broken.jpg"})
    lines[7] = json.dumps({"id": 7, "words": ["kawhi", "wins"]})
    source = write(tmp_path / "tweets.jsonl", lines)
    arguments = ["--batch-size", "2", "--image-dir", workspace["images"], "--word-tags", random_model, source]
    single = tmp_path / "single.jsonl"
    code, _, err = run_cli(arguments + ["-o", single], capsys)
    assert code == 0, err
    together = tmp_path / "together.jsonl"
    completed = torchrun(arguments + ["-o", together], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert together.read_bytes() == single.read_bytes()
    records = [json.loads(line) for line in single.read_text().splitlines()]
    assert len(records) == 8 and len({entity["score"] for record in records for entity in record["entities"]}) > 8
    # batches of 2 records: [0,1] [2,(3),4] [5,6] [7,8] -> process 0 tags batches 0 and 2, process 1 batches 1 and 3
    summaries = [line for line in completed.stderr.splitlines() if "tweets tagged" in line]
    assert len(summaries) == 1, completed.stderr[-3000:]
    assert "8 tweets tagged" in summaries[0] and "by 2 processes (process 0: 4, process 1: 4)" in summaries[0]
    assert "1 skipped (errors above; lines 4)" in summaries[0] and "1 unreadable image(s)" in summaries[0]
    assert completed.stderr.count(f"{source}:4: error: invalid JSON") == 1
    assert completed.stderr.count(f"{source}:7: warning:") == 1
    assert not os.path.exists(f"{together}.partial") and not os.path.exists(f"{together}.partial.json")


def test_environment_and_devices(monkeypatch, tmp_path, capsys):
    assert Processes.from_environment({}) == Processes(rank=0, world=1, local_rank=0)
    processes = Processes.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (processes.rank, processes.world, processes.local_rank) == (3, 4, 1)
    assert processes.device(None, cuda_available=True) == "cuda:1"
    assert processes.device("cuda", cuda_available=True) == "cuda:1"
    assert processes.device("cpu", cuda_available=True) == "cpu"
    assert processes.device("cuda:0", cuda_available=True) == "cuda:0"
    assert processes.device(None, cuda_available=False) is None
    assert Processes.from_environment({}).device(None, cuda_available=True) is None  # one process: the pipeline's
    for environ in ({"WORLD_SIZE": "two"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}):
        try:
            Processes.from_environment(environ)
        except UsageError as error:
            assert "WORLD_SIZE" in str(error)
        else:
            raise AssertionError(f"{environ} was accepted")
    # stdin cannot be split, and bad variables are reported, before any process group or model
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main([str(tmp_path / "no-model"), "-", "--input-format", "jsonl", "--no-progress"])
    assert code == 2 and "stdin cannot be split between 2 processes" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "x")
    code = main([str(tmp_path / "no-model"), "-", "--input-format", "jsonl", "--no-progress"])
    assert code == 2 and "must be integers" in capsys.readouterr().err


def test_a_process_group_of_the_caller_is_used_and_must_match_world_size():
    import torch.distributed as distributed

    store = distributed.HashStore()
    distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        processes = Processes(rank=0, world=2)
        with pytest.raises(RuntimeError, match="WORLD_SIZE is 2 but the process group has 1"):
            processes.start()
        assert not processes.started_group  # the caller's group is left to the caller
    finally:
        distributed.destroy_process_group()


def test_two_processes_resume_a_single_process_run_of_conll(workspace, tmp_path, capsys, monkeypatch):
    lines = []
    for index in range(7):
        lines += [f"IMGID:t{index}", *(f"word{index}_{word}\tO" for word in range(1 + index % 3)), ""]
    source = write(tmp_path / "test.txt", lines)
    arguments = ["--batch-size", "2", workspace["model"], source]
    reference = tmp_path / "reference.conll"
    assert run_cli(arguments + ["-o", reference], capsys)[0] == 0
    output = tmp_path / "out.conll"
    run, calls = predict_cli.Predictor.run, []

    def interrupted(self, records):
        calls.append(records)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return run(self, records)

    monkeypatch.setattr(predict_cli.Predictor, "run", interrupted)
    assert run_cli(arguments + ["-o", output], capsys)[0] == 130
    monkeypatch.undo()
    assert (tmp_path / "out.conll.partial").read_text().count("IMGID:") == 2
    # the rest, [t2 t3] [t4 t5] [t6], is split between two processes: 0 tags [t2 t3] and [t6], 1 tags [t4 t5]
    completed = torchrun(arguments + ["-o", output, "--resume"], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert output.read_bytes() == reference.read_bytes()
    assert "7 tweets tagged" in completed.stderr and "by 2 processes (process 0: 3, process 1: 2)" in completed.stderr
    assert "(2 of them before the interrupted run was resumed)" in completed.stderr


def accelerate_launch(launch_options, arguments, tmp_path) -> subprocess.CompletedProcess:
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", **ENV)
    return subprocess.run(
        [accelerate, "launch", *launch_options, "-m", "predict_pmner.cli", *map(str, arguments),
         "--device", "cpu", "--no-progress"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_accelerate_launch_cpu_with_two_processes_warns_and_its_advice_works(workspace, random_model, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` starts one process: one warning line names the command that starts
    two, and that command splits the input between two processes."""
    source = write(tmp_path / "tweets.jsonl", [json.dumps({"id": index, "text": f"tweet {index} about london"})
                                               for index in range(4)])
    arguments = ["--batch-size", "2", random_model, source]
    one = accelerate_launch(["--num_processes", "2", "--cpu"], arguments + ["-o", tmp_path / "one.jsonl"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    warnings = [line for line in one.stderr.splitlines() if "started only this one" in line]
    assert len(warnings) == 1 and warnings[0].startswith("pmner-predict: warning: `accelerate launch` was asked for 2")
    advice = "`accelerate launch --multi_gpu --num_processes 2 -m predict_pmner ... --device cpu`"
    assert advice in warnings[0] and "`torchrun --nproc_per_node 2 -m predict_pmner" in warnings[0]
    assert "4 tweets tagged" in one.stderr and "by 2 processes" not in one.stderr
    two = accelerate_launch(["--multi_gpu", "--num_processes", "2"], arguments + ["-o", tmp_path / "two.jsonl"],
                            tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "by 2 processes (process 0: 2, process 1: 2)" in two.stderr and "started only this one" not in two.stderr
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_no_warning_without_a_launcher_or_with_one_that_started_every_process(monkeypatch):
    from predict_pmner.cli import unstarted_processes_warning

    for name in ("ACCELERATE_MIXED_PRECISION", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert unstarted_processes_warning("pmner-predict", "x") is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert unstarted_processes_warning("pmner-predict", "x") is None  # one process asked: no MASTER_PORT
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert "asked for several processes" in unstarted_processes_warning("pmner-predict", "x")  # pytest's parent
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert unstarted_processes_warning("pmner-predict", "x") is None  # torchrun / --multi_gpu started them
