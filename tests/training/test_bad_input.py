"""Bad input, one table: every row is a command or a call with something wrong in it, and what the user must get
back: the exit status (2 for a usage error) and the first words of a one-line message, with no stack trace and
nothing written where it would lose data. A new check goes here as a row, not as a one-off test.

The training rows run `train_pmner.py` as a user does (a subprocess); each stops before any image is read and
before training starts. The `pmner-predict` and `app.py` rows call their `main`."""

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from fixtures import ENV, PROJECT, stderr_lines, write_tiny_masked_lm, write_twitter_fixture


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    write_tiny_masked_lm(root / "tiny-bert")
    write_twitter_fixture(root / "data", root / "images", sizes=(16, 4, 4))
    (root / "not-weights.safetensors").write_text("these are not weights\n")
    (root / "a-file").write_text("a file where a folder is expected\n")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01binary\n")
    (root / "duplicate.yaml").write_text("learning_rate: 0.001\nseed: 3\nlearning_rate: 0.002\n")
    (root / "epochs.yaml").write_text("num_train_epochs: 1.0e+308\n")
    (root / "string-bool.yaml").write_text('other_as_misc: "no"\n')
    (root / "files").mkdir()
    (root / "files" / "bad-train.conll").write_bytes(_bad_tag((root / "data" / "train.txt").read_bytes()))
    for name, damage in DATA_DAMAGE.items():
        shutil.copytree(root / "data", root / name)
        train = root / name / "train.txt"
        train.write_bytes(damage(train.read_bytes()))
    return root


def _bad_tag(data: bytes) -> bytes:
    return data.replace(b"\tB-PER", b"\tB-PERSON", 1)


DATA_DAMAGE = {
    "data-bad-tag": _bad_tag,
    "data-no-imgid": lambda data: data.split(b"\n", 1)[1],
    "data-latin1": lambda data: data.replace(b"visits", "visités".encode("latin-1"), 1),
    "data-empty": lambda data: b"",
    "data-no-tab": lambda data: data.replace(b"\t", b" ", 3),
}


def train_args(workspace, *extra, visual=False, epochs=True):
    args = [
        "--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"),
        "--text_model_name_or_path", str(workspace / "tiny-bert"), "--fusion_num_heads", "4",
        "--do_train", *(["--num_train_epochs", "1"] if epochs else []), "--use_cpu", "--report_to", "none",
        "--output_dir", str(workspace / "runs" / "refused"),  # each row runs with a folder of its own
    ]
    if visual:
        args += ["--image_dir", str(workspace / "images"), "--detector", "none", "--backbone", "resnet18",
                 "--backbone_weights", "random:1", "--crop_size", "32"]
    return args + list(extra)


# (row id, arguments given the workspace, expected first words of the message after "error: ")
TRAIN_ROWS = [
    ("tag scheme", lambda w: train_args(w, "--tag_scheme", "FOO"), "tag_scheme must be one of"),
    ("head", lambda w: train_args(w, "--head", "foo"), "head must be one of"),
    ("fusion", lambda w: train_args(w, "--fusion", "foo"), "fusion must be one of"),
    ("heads not dividing", lambda w: train_args(w, "--fusion_num_heads", "5"), "fusion_num_heads=5 must divide"),
    ("zero heads", lambda w: train_args(w, "--fusion_num_heads", "0"), "fusion_num_heads must be a positive integer"),
    ("tiny max_seq_length", lambda w: train_args(w, "--max_seq_length", "4"), "max_length=4 leaves no room"),
    ("max_seq_length over positions", lambda w: train_args(w, "--max_seq_length", "100000"),
     "--max_seq_length 100000 is more than the 128 tokens"),
    ("template without sentence", lambda w: train_args(w, "--prompt_template", "the {word} is {mask}"),
     "prompt_template='the {word} is {mask}' has no {sentence} field"),
    ("score threshold", lambda w: train_args(w, "--score_threshold", "2", visual=True), "score_threshold must be in [0, 1]"),
    ("max objects", lambda w: train_args(w, "--max_objects", "0", visual=True), "max_objects must be at least 1"),
    ("crop size", lambda w: train_args(w, "--crop_size", "-1", visual=True), "crop_size must be positive"),
    ("detector", lambda w: train_args(w, "--detector", "foo", visual=True), "--detector 'foo' is not a torchvision model builder"),
    ("missing weights", lambda w: train_args(w, "--backbone_weights", str(w / "missing.safetensors"), visual=True),
     "FRR networks of the FRR settings: backbone_weights="),
    ("not weights", lambda w: train_args(w, "--backbone_weights", str(w / "not-weights.safetensors"), visual=True),
     "FRR networks of the FRR settings:"),
    ("random seed not a number", lambda w: train_args(w, "--backbone_weights", "random:abc", visual=True),
     "backbone_weights='random:abc': expected 'random' or 'random:SEED'"),
    ("torchvision weights offline", lambda w: train_args(w, "--backbone_weights", "DEFAULT", visual=True),
     "FRR networks of the FRR settings: Could not load backbone_weights='ResNet18_Weights.IMAGENET1K_V1'"),
    ("feature cache is a file", lambda w: train_args(w, "--feature_cache_dir", str(w / "a-file"), visual=True),
     "--feature_cache_dir"),
    ("detector kwargs a list", lambda w: train_args(w, "--detector_kwargs", "[1, 2]", visual=True),
     "--detector_kwargs must be a JSON object, got list"),
    ("detector kwargs not JSON", lambda w: train_args(w, "--detector_kwargs", "{box: 0}", visual=True),
     "--detector_kwargs must be a JSON object"),
    ("detector kwargs unknown name",
     lambda w: train_args(w, "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn", "--detector_kwargs",
                          '{"box_score_thres": 0.0}', visual=True),
     "--detector_kwargs {\"box_score_thres\": 0.0}: the builder fasterrcnn_mobilenet_v3_large_320_fpn does not take"),
    ("detector kwargs without detector", lambda w: train_args(w, "--detector_kwargs", "{}", visual=True),
     "--detector_kwargs are arguments of the detector builder"),
    ("require objects without detector", lambda w: train_args(w, "--require_objects", visual=True),
     "--require_objects needs a detector"),
    ("negative learning rate", lambda w: train_args(w, "--learning_rate", "-1"), "--learning_rate must be a positive number"),
    ("zero batch size", lambda w: train_args(w, "--per_device_train_batch_size", "0"),
     "--per_device_train_batch_size must be at least 1"),
    ("negative seed", lambda w: train_args(w, "--seed", "-1"), "--seed must be in [0, 2**32)"),
    ("huge epochs in a file", lambda w: [str(w / "epochs.yaml")] + train_args(w, epochs=False),
     "--num_train_epochs must be a number in"),
    ("zero epochs", lambda w: train_args(w, "--num_train_epochs", "0"), "--do_train with --num_train_epochs 0 trains nothing"),
    ("unknown metric", lambda w: train_args(w, "--metric_for_best_model", "nope"),
     "--metric_for_best_model 'nope' is not a metric this run reports"),
    ("missing text model", lambda w: train_args(w, "--text_model_name_or_path", str(w / "no-such-model")),
     "--text_model_name_or_path"),
    ("duplicate key", lambda w: [str(w / "duplicate.yaml")] + train_args(w), ""),
    ("string for a boolean", lambda w: [str(w / "string-bool.yaml")] + train_args(w), ""),
    ("binary context file", lambda w: train_args(w, "--context_file", str(w / "binary.jsonl")), ""),
    ("retrieval over the training set", lambda w: train_args(w, "--retrieval_context", "100000"),
     "--retrieval_context 100000 asks for more neighbours than the 16 training tweets"),
    ("data: bad tag", lambda w: train_args(w, "--data_dir", str(w / "data-bad-tag")), ""),
    ("data: no IMGID", lambda w: train_args(w, "--data_dir", str(w / "data-no-imgid")), ""),
    ("data: Latin-1", lambda w: train_args(w, "--data_dir", str(w / "data-latin1")), ""),
    ("data: empty file", lambda w: train_args(w, "--data_dir", str(w / "data-empty")), ""),
    ("data: no tab", lambda w: train_args(w, "--data_dir", str(w / "data-no-tab")), ""),
    ("train file not in the format", lambda w: drop_data_dir(train_args(
        w, "--train_file", str(w / "files" / "bad-train.conll"), "--validation_file", str(w / "data" / "valid.txt"),
        "--test_file", str(w / "data" / "test.txt"))), ""),
    ("train file alone", lambda w: drop_data_dir(train_args(w, "--train_file", str(w / "data" / "train.txt"))),
     "--train_file also needs --validation_file and --test_file"),
    ("train file and data dir", lambda w: train_args(
        w, "--train_file", str(w / "data" / "train.txt"), "--validation_file", str(w / "data" / "valid.txt"),
        "--test_file", str(w / "data" / "test.txt")), "--data_dir and --train_file both name the data"),
    ("missing validation file", lambda w: drop_data_dir(train_args(
        w, "--train_file", str(w / "data" / "train.txt"), "--validation_file", str(w / "data" / "no-such.txt"),
        "--test_file", str(w / "data" / "test.txt"))), "--validation_file"),
    ("zero tokenisation workers", lambda w: train_args(w, "--preprocessing_num_workers", "0"),
     "--preprocessing_num_workers must be at least 1, got 0"),
    ("run_ner.py's label_all_tokens", lambda w: train_args(w, "--label_all_tokens"),
     "--label_all_tokens is a run_ner.py argument that train_pmner.py does not take: P-MNER labels"),
    ("run_ner.py's text_column_name", lambda w: train_args(w, "--text_column_name", "words"),
     "--text_column_name is a run_ner.py argument that train_pmner.py does not take"),
    ("run_ner.py's return_entity_level_metrics", lambda w: train_args(w, "--return_entity_level_metrics=true"),
     "--return_entity_level_metrics is a run_ner.py argument"),
    ("model path that is not a model",
     lambda w: train_args(w, "--model_name_or_path", str(w / "no-such-model"), "--model_revision", "v1"),
     f"--text_model_name_or_path '{{model}}' (revision 'v1') is neither a local folder nor a Hub model repository"),
]


def drop_data_dir(args: list) -> list:
    index = args.index("--data_dir")
    return args[:index] + args[index + 2 :]

# rows whose message is checked for the file it must name rather than fixed first words
NAMES_FILE = {
    "duplicate key": ("duplicate.yaml: the key 'learning_rate' is given twice (line 3)",),
    "string for a boolean": ("string-bool.yaml: other_as_misc: expected true or false",),
    "binary context file": ("binary.jsonl", "not UTF-8 text"),
    "data: bad tag": ("data-bad-tag", "train.txt, line"),
    "data: no IMGID": ("data-no-imgid", "train.txt, line"),
    "data: Latin-1": ("data-latin1", "cannot decode bytes as utf-8"),
    "data: empty file": ("data-empty", "train.txt"),
    "data: no tab": ("data-no-tab", "found no tab"),
    "train file not in the format": ("bad-train.conll, line",),
    "missing validation file": ("no-such.txt' is not a file",),
}


@pytest.mark.parametrize("row, make_args, message", TRAIN_ROWS, ids=[row for row, *_ in TRAIN_ROWS])
def test_train_pmner_bad_input(workspace, row, make_args, message):
    env = dict(os.environ, HF_HOME=str(workspace / "hf-home"), **ENV)
    output_dir = workspace / "runs" / re.sub(r"\W+", "-", row)
    args = [str(output_dir) if arg == str(workspace / "runs" / "refused") else arg for arg in make_args(workspace)]
    result = subprocess.run(
        [sys.executable, os.path.join(PROJECT, "train_pmner.py"), *args],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=300,
    )
    lines = stderr_lines(result.stderr)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("train_pmner.py: error: "), lines
    message = message.replace("{model}", str(workspace / "no-such-model"))
    assert lines[0][len("train_pmner.py: error: ") :].startswith(message), lines[0]
    for expected in NAMES_FILE.get(row, ()):
        assert expected in lines[0], lines[0]
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "README.md").exists()


# -- pmner-predict ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folders(workspace):
    from pipeline_builders import build_model, build_processor, save_folder

    text_model = str(workspace / "tiny-bert")
    model = build_model(text_model)
    folder = save_folder(workspace / "model", model, build_processor(text_model, model))
    folders = {"good": folder}
    damaged = workspace / "model-damaged-weights"
    shutil.copytree(folder, damaged)
    data = bytearray((damaged / "frr_backbone.safetensors").read_bytes())
    data[-3] ^= 0x55  # same size, other weights: only the recorded sha256 tells
    (damaged / "frr_backbone.safetensors").write_bytes(bytes(data))
    folders["damaged weights"] = str(damaged)
    no_tokenizer = workspace / "model-no-tokenizer"
    shutil.copytree(folder, no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    folders["no tokenizer.json"] = str(no_tokenizer)
    other_dim = workspace / "model-other-feature-dim"
    shutil.copytree(folder, other_dim)
    config = json.loads((other_dim / "config.json").read_text())
    config["visual_feature_dim"] = 256
    (other_dim / "config.json").write_text(json.dumps(config))
    folders["config against weights"] = str(other_dim)
    return folders


def tweets_file(workspace) -> str:
    path = workspace / "tweets.jsonl"
    path.write_text(json.dumps({"text": "obama visits london"}) + "\n")
    return str(path)


SOCKETS = []  # kept open while the module runs


def a_socket(workspace) -> str:
    path = str(workspace / "a.sock")
    if not os.path.exists(path):
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        SOCKETS.append(server)
    return path


def a_fifo(workspace) -> str:
    path = workspace / "nobody-reads.fifo"
    if not path.exists():
        os.mkfifo(path)
    return str(path)


# (row id, pmner-predict arguments given the workspace and the model folders, expected first words)
PREDICT_ROWS = [
    ("damaged FRR weights", lambda w, m: [m["damaged weights"], tweets_file(w), "-o", str(w / "out1.jsonl")],
     "cannot load the model"),
    ("no tokenizer.json", lambda w, m: [m["no tokenizer.json"], tweets_file(w), "-o", str(w / "out2.jsonl")],
     "cannot load the model"),
    ("config against weights", lambda w, m: [m["config against weights"], tweets_file(w), "-o", str(w / "out3.jsonl")],
     "cannot load the model"),
    ("resume into a device", lambda w, m: [m["good"], tweets_file(w), "-o", os.devnull, "--resume"],
     "--resume needs a regular output file: /dev/null is a character device"),
    ("output a socket", lambda w, m: [m["good"], tweets_file(w), "-o", a_socket(w)], "output"),
    ("output a FIFO nobody reads", lambda w, m: [m["good"], tweets_file(w), "-o", a_fifo(w)],
     "output"),
]
PREDICT_NAMES = {
    "damaged FRR weights": ("frr_backbone.safetensors has sha256",),
    "no tokenizer.json": ("has no tokenizer.json",),
    "config against weights": ("config.json of", "does not describe its model.safetensors", "pmner.visual_projection.weight"),
    "output a socket": ("is a socket",),
    "output a FIFO nobody reads": ("is a FIFO that nobody reads",),
}


@pytest.mark.parametrize("row, make_args, message", PREDICT_ROWS, ids=[row for row, *_ in PREDICT_ROWS])
def test_pmner_predict_bad_input(workspace, model_folders, capsys, row, make_args, message):
    from predict_pmner.cli import main

    args = make_args(workspace, model_folders)
    code = main([str(arg) for arg in args] + ["--no-progress", "--device", "cpu"])
    lines = stderr_lines(capsys.readouterr().err)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("pmner-predict: error: "), lines
    assert lines[0][len("pmner-predict: error: ") :].startswith(message), lines[0]
    for expected in PREDICT_NAMES.get(row, ()):
        assert expected in lines[0], lines[0]
    output = args[args.index("-o") + 1]
    assert not os.path.exists(output + ".partial")
    if output == os.devnull:
        assert stat.S_ISCHR(os.stat(os.devnull).st_mode)  # never replaced by a regular file


def test_pmner_predict_writes_a_device_or_a_fifo_as_a_stream(workspace, model_folders, capsys):
    from predict_pmner.cli import main

    tweets = tweets_file(workspace)
    assert main([model_folders["good"], tweets, "-o", os.devnull, "--no-progress", "--device", "cpu"]) == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and not os.path.exists(os.devnull + ".partial")
    fifo = workspace / "read.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the reader is there before the writer opens it
    try:
        code = main([model_folders["good"], tweets, "-o", str(fifo), "--no-progress", "--device", "cpu"])
        received = os.read(reader, 1 << 16)  # one small record: well within the pipe's buffer
    finally:
        os.close(reader)
    assert code == 0
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still the FIFO
    assert json.loads(received.decode().splitlines()[0])["text"] == "obama visits london"
    capsys.readouterr()


# -- app.py and Python calls -----------------------------------------------------------------------------------------


APP_ROWS = [
    ("port out of range", ["--model", "x", "--port", "99999"], "--port must be in [1, 65535], got 99999"),
    ("zero threads", ["--model", "x", "--threads", "0"], "--threads must be at least 1, got 0"),
]


@pytest.mark.parametrize("row, args, message", APP_ROWS, ids=[row for row, *_ in APP_ROWS])
def test_app_bad_input(capsys, row, args, message):
    sys.path.insert(0, PROJECT)
    try:
        import app
    finally:
        sys.path.remove(PROJECT)
    assert app.main(args) == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0] == f"app.py: error: {message}", lines


def test_boolean_settings_of_the_loader_take_booleans_only(workspace):
    from training_pmner.twitter_mner import load_twitter_mner

    with pytest.raises(TypeError, match="other_as_misc must be True or False, got 'no'"):
        load_twitter_mner("twitter2017", data_dir=str(workspace / "data"), other_as_misc="no")
    with pytest.raises(TypeError, match="verify_images must be True or False, got 1"):
        load_twitter_mner("twitter2017", data_dir=str(workspace / "data"), verify_images=1)
