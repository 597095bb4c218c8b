"""`pmner-predict` never loses data: the input is never the output, the output appears only when complete, an
interrupted run resumes, and unusable arguments stop the run (exit 2, one line) before the model loads."""

import json
import os
import signal
import stat
import sys
import time

import pytest

from predict_cli_runner import run_cli, write

from predict_pmner import cli as predict_cli
from predict_pmner.cli import main


TWEETS = [json.dumps({"id": index, "text": f"tweet {index} from london " * (1 + index % 3)}) for index in range(7)]


def refused(arguments, capsys, missing_model) -> str:
    """Runs the CLI with a model that does not exist: the refusal must come first, fast, in one line."""
    started = time.perf_counter()
    code = main([str(missing_model), *map(str, arguments), "--no-progress"])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert "cannot load the model" not in err and len(err.strip().splitlines()) == 1, err
    assert elapsed < 3, f"{elapsed:.1f} s: the model was loaded?"
    return err


@pytest.mark.parametrize("spelling", ["same path", "other spelling", "symlink", "hard link"])
def test_output_that_is_the_input_is_refused_and_the_input_kept(spelling, tmp_path, capsys):
    source = write(tmp_path / "tweets.jsonl", TWEETS)
    before = open(source, "rb").read()
    other_spelling = tmp_path / "." / ".." / tmp_path.name / "tweets.jsonl"
    output = {"same path": source, "other spelling": other_spelling}.get(spelling)
    if spelling == "symlink":
        output = tmp_path / "link.jsonl"
        os.symlink(source, output)
    elif spelling == "hard link":
        output = tmp_path / "hard.jsonl"
        os.link(source, output)
    err = refused([source, "-o", output], capsys, tmp_path / "no-model")
    assert "is the input file" in err
    assert open(source, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == sorted({os.path.basename(source), os.path.basename(output)})  # no partial


def test_standard_streams_that_are_the_input_or_output_are_refused(tmp_path, capsys, monkeypatch):
    source = write(tmp_path / "tweets.jsonl", TWEETS)
    before = open(source, "rb").read()
    # `pmner-predict MODEL tweets.jsonl >> tweets.jsonl`: the standard output is the input, opened for appending
    with open(source, "a", encoding="utf-8") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        err = refused([source], capsys, tmp_path / "no-model")
    monkeypatch.undo()
    assert "the standard output goes into the input file" in err
    assert open(source, "rb").read() == before
    # `pmner-predict MODEL - --input-format jsonl -o tweets.jsonl < tweets.jsonl`
    with open(source, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        err = refused(["-", "--input-format", "jsonl", "-o", source], capsys, tmp_path / "no-model")
    assert "is the input file" in err and open(source, "rb").read() == before


def test_unusable_arguments_exit_2_in_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    source = write(tmp_path / "tweets.jsonl", TWEETS)
    (tmp_path / "folder").mkdir()
    (tmp_path / "left.jsonl.partial").write_text("{}\n")
    os.mkfifo(tmp_path / "pipe")  # read by nothing: a check that opened it would block
    model = tmp_path / "no-model"
    cases = [
        ([tmp_path / "pipe"], "pipe (not a regular file): pass --input-format jsonl or conll"),
        ([tmp_path / "pipe", "--input-format", "jsonl", "-o", tmp_path / "o.jsonl", "--resume"], "cannot be checked"),
        ([source, "-o", tmp_path / "missing" / "out.jsonl"], "missing) does not exist"),
        ([source, "-o", tmp_path / "folder"], "is a folder; pass a file name"),
        ([source, "-o", tmp_path / "tweets.jsonl" / "out.jsonl"], "tweets.jsonl) is not a folder"),
        (["-"], "reading stdin: pass --input-format jsonl or conll"),
        ([tmp_path / "folder"], "is a folder; pass a JSONL or CoNLL file"),
        ([tmp_path / "missing.jsonl"], "missing.jsonl does not exist"),
        ([source, "-o", tmp_path / "left.jsonl"], "left.jsonl.partial is left from an interrupted run: pass --resume"),
        ([source, "-o", tmp_path / "out.jsonl", "--resume"], "there is no"),
        ([source, "--resume"], "--resume needs an output file"),
        (["-", "--input-format", "jsonl", "-o", tmp_path / "out.jsonl", "--resume"], "--resume needs an input file"),
        ([source, "--feature-cache-dir", source], "is a file, not a folder"),
        ([source, "--image-dir", tmp_path / "nowhere"], "is not a folder"),
        ([source, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ([source, "--threads", "0"], "--threads must be at least 1, got 0"),
        ([source, "--cache-flush-size", "-1"], "--cache-flush-size must be at least 1, got -1"),
        ([tmp_path / "left.jsonl.partial", "-o", tmp_path / "left.jsonl"], "would be the input file"),
    ]
    for arguments, message in cases:
        err = refused(arguments, capsys, model)
        assert message in err, (arguments, err)
    # permissions (denied through os.access, which the checks use: root would be allowed anything)
    locked, access = tmp_path / "locked", os.access
    locked.mkdir()
    (locked / "secret.jsonl").write_text(TWEETS[0] + "\n")
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(locked)) and access(path, mode))
    assert "cannot write in the folder" in refused([source, "-o", locked / "out.jsonl"], capsys, model)
    assert "secret.jsonl is not readable" in refused([locked / "secret.jsonl"], capsys, model)
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / "out.jsonl.partial")
    # the model is loaded only once the output is known good; a model that fails leaves no partial output behind
    code = main([str(model), source, "-o", str(tmp_path / "out.jsonl"), "--no-progress"])
    assert code == 2 and "cannot load the model" in capsys.readouterr().err
    assert not [name for name in os.listdir(tmp_path) if name.startswith(("out.jsonl", "o.jsonl"))]


def interrupt_after(monkeypatch, batches: int, how: str = "ctrl-c"):
    """Makes the run stop (Ctrl-C, or a real SIGTERM to this process) when the pipeline is called for the
    `batches + 1`-th batch."""
    run, calls = predict_cli.Predictor.run, []

    def interrupted(self, records):
        calls.append(len(records))
        if len(calls) > batches:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(120)  # the handler raises long before this ends
            raise KeyboardInterrupt
        return run(self, records)

    monkeypatch.setattr(predict_cli.Predictor, "run", interrupted)


def test_an_interrupted_run_keeps_the_old_output_and_resumes_to_the_same_bytes(workspace, tmp_path, capsys,
                                                                                monkeypatch):
    lines = TWEETS[:3] + ["not json"] + TWEETS[3:]
    source = write(tmp_path / "tweets.jsonl", lines)
    arguments = [workspace["model"], source, "--batch-size", "2", "--word-tags"]
    reference = tmp_path / "reference.jsonl"
    assert run_cli(arguments + ["-o", reference], capsys)[0] == 0
    output = tmp_path / "out.jsonl"
    output.write_text("an older output\n")
    os.chmod(output, 0o640)

    interrupt_after(monkeypatch, 2)
    code, _, err = run_cli(arguments + ["-o", output], capsys)
    assert code == 130
    assert "interrupted: the 4 tweets done are kept in" in err and "--resume" in err
    assert output.read_text() == "an older output\n"
    partial = tmp_path / "out.jsonl.partial"
    assert partial.read_bytes() == b"".join(reference.read_bytes().splitlines(keepends=True)[:4])
    progress = json.loads((tmp_path / "out.jsonl.partial.json").read_text())
    assert (progress["entries"], progress["last_line"], progress["tagged"], progress["failed"]) == (5, 5, 4, 1)
    monkeypatch.undo()

    with open(partial, "ab") as handle:
        handle.write(b'{"line": 6, "text": "half a rec')  # a write cut by a kill after the last saved progress
    assert "is left from an interrupted run" in run_cli(arguments + ["-o", output], capsys)[2]
    code, _, err = run_cli(arguments + ["--aggregation-strategy", "first", "-o", output, "--resume"], capsys)
    assert code == 2 and "aggregation_strategy: 'simple' then, 'first' now" in err
    code, _, err = run_cli(arguments + ["-o", output, "--resume"], capsys)
    assert code == 0, err
    assert "resuming after input line 5 (4 tweets already written)" in err
    assert "7 tweets tagged" in err and "(4 of them before the interrupted run was resumed)" in err
    assert "1 skipped (errors above; lines 4)" in err
    assert output.read_bytes() == reference.read_bytes()
    assert stat.S_IMODE(os.stat(output).st_mode) == 0o640
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("out")) == ["out.jsonl"]


def test_resume_refuses_a_changed_input_or_a_damaged_progress_file(workspace, tmp_path, capsys, monkeypatch):
    source = write(tmp_path / "tweets.jsonl", TWEETS)
    output = tmp_path / "out.jsonl"
    arguments = [workspace["model"], source, "--batch-size", "2", "-o", output]
    interrupt_after(monkeypatch, 1, how="sigterm")
    handler, started = signal.getsignal(signal.SIGTERM), time.perf_counter()
    code, _, err = run_cli(arguments, capsys)
    assert code == 130 and time.perf_counter() - started < 60 and "interrupted: the 2 tweets done are kept" in err
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back
    monkeypatch.undo()
    partial, progress_file = tmp_path / "out.jsonl.partial", tmp_path / "out.jsonl.partial.json"
    saved = progress_file.read_text()

    with open(source, "a") as handle:
        handle.write(json.dumps({"text": "one more"}) + "\n")
    code, _, err = run_cli(arguments + ["--resume"], capsys)
    assert code == 2 and "input_size:" in err and "delete" in err
    write(tmp_path / "tweets.jsonl", TWEETS)
    progress = json.loads(saved)
    progress["settings"]["input_mtime_ns"] = os.stat(source).st_mtime_ns
    progress_file.write_text(json.dumps(dict(progress, bytes=partial.stat().st_size + 1)))
    code, _, err = run_cli(arguments + ["--resume"], capsys)
    assert code == 2 and "is shorter than the" in err
    progress_file.write_text("{not json")
    code, _, err = run_cli(arguments + ["--resume"], capsys)
    assert code == 2 and f"cannot read {progress_file}" in err
    progress_file.write_text(json.dumps({"version": 99}))
    code, _, err = run_cli(arguments + ["--resume"], capsys)
    assert code == 2 and "is not a progress file of this version" in err
    progress_file.write_text(json.dumps(progress))
    code, _, err = run_cli(arguments + ["--resume"], capsys)
    assert code == 0 and "7 tweets tagged" in err, err
    assert len(output.read_text().splitlines()) == 7 and not partial.exists() and not progress_file.exists()


def test_output_problems_after_the_checks_are_reported_with_their_line_or_file(workspace, tmp_path, capsys,
                                                                                monkeypatch):
    source = write(tmp_path / "tweets.jsonl", TWEETS[:3])
    output = tmp_path / "out.jsonl"
    # a result that cannot be written is that line's error; the others are written
    format_jsonl = predict_cli.format_jsonl

    def failing(record, result, word_tags):
        if record.line == 2:
            raise RuntimeError("cannot format this one")
        return format_jsonl(record, result, word_tags)

    monkeypatch.setattr(predict_cli, "format_jsonl", failing)
    code, _, err = run_cli([workspace["model"], source, "-o", output], capsys)
    assert code == 0 and f"{source}:2: error: RuntimeError: cannot format this one" in err and "2 tweets tagged" in err
    assert [json.loads(line)["line"] for line in output.read_text().splitlines()] == [1, 3]
    monkeypatch.undo()
    # another run took the partial output between the checks and the model load: this one stops, the other's file kept
    monkeypatch.setattr(predict_cli, "check_output", lambda *arguments: None)
    (tmp_path / "out.jsonl.partial").write_text("another run's\n")
    code, _, err = run_cli([workspace["model"], source, "-o", output], capsys)
    assert code == 2 and "cannot write the output" in err and "File exists" in err
    assert (tmp_path / "out.jsonl.partial").read_text() == "another run's\n"
