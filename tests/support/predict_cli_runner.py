"""Running `pmner-predict` in the tests: its `main` in this process with stdout and stderr captured, input files
written line by line, and the environment of an offline subprocess."""

from predict_pmner.cli import main


ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run_cli(args, capsys):
    code = main([str(arg) for arg in args] + ["--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
