"""--head_learning_rate: the layers P-MNER adds (fusion, visual projection, prompt head or classifier) train at their
own learning rate beside the pretrained text encoder's --learning_rate, through the Trainer's optimizer groups."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fixtures import ENV, PROGRESS_BAR, PROJECT, write_training_workspace
from model_tester import Rows, accumulation_rows, tester
from modeling_pmner import PMNERForTokenClassification
from training_pmner.arguments import PMNERTrainingArguments
from training_pmner.optimizer import PMNERTrainer


ENCODER_LR, HEAD_LR = 1e-4, 5e-3


def tiny_model(**kwargs) -> PMNERForTokenClassification:
    torch.manual_seed(0)
    return PMNERForTokenClassification(tester.get_config(**kwargs))


def training_arguments(tmp_path, **kwargs) -> PMNERTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "run"), learning_rate=ENCODER_LR, head_learning_rate=HEAD_LR, weight_decay=0.01,
        use_cpu=True, report_to=[], eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        dataloader_num_workers=0, seed=0,
    )
    return PMNERTrainingArguments(**{**settings, **kwargs})


def group_of_each_parameter(optimizer) -> dict[int, dict]:
    groups = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert id(parameter) not in groups, "a parameter in two groups"
            groups[id(parameter)] = group
    return groups


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(head="linear"), dict(verbalizer_trainable=True), dict(use_visual=False), dict(fusion="concat")],
    ids=["verbalizer", "linear", "trainable-label-words", "text-only", "concat"],
)
def test_encoder_parameters_train_at_learning_rate_and_the_rest_at_head_learning_rate(tmp_path, settings):
    model = tiny_model(**settings)
    trainer = PMNERTrainer(model=model, args=training_arguments(tmp_path))
    optimizer = trainer.create_optimizer()
    groups = group_of_each_parameter(optimizer)
    named = dict(model.named_parameters())
    assert set(groups) == {id(parameter) for parameter in named.values()}, "a parameter left out of the optimizer"
    encoder = {id(parameter) for parameter in model.pmner.text_model.parameters()}
    decay = set(trainer.get_decay_parameter_names(model))
    for name, parameter in named.items():
        group = groups[id(parameter)]
        assert group["lr"] == (ENCODER_LR if name.startswith("pmner.text_model.") else HEAD_LR), name
        assert (id(parameter) in encoder) == name.startswith("pmner.text_model."), name
        assert group["weight_decay"] == (0.01 if name in decay else 0.0), name
    assert optimizer.param_groups[0]["lr"] == ENCODER_LR  # the group the Trainer logs as learning_rate
    # the layers named in the help: all at the head's rate (the MLM head transform of the prompt head included)
    added = [name for name in named if not name.startswith("pmner.text_model.")]
    assert any(name.startswith("classifier." if settings.get("head") == "linear" else "verbalizer_head.dense.")
               for name in added)
    if settings.get("use_visual", True):
        assert any(name.startswith("pmner.visual_projection.") for name in added)
        assert any(name.startswith("pmner.fusion.") for name in added)
    assert len(optimizer.param_groups) == 4  # (encoder, head) x (weight decay, none)


def test_a_weight_shared_with_the_encoder_trains_at_the_encoder_rate(tmp_path):
    model = tiny_model()
    shared = model.pmner.text_model.encoder.layer[0].attention.output.dense.weight  # (hidden, hidden)
    model.verbalizer_head.dense.weight = shared
    optimizer = PMNERTrainer(model=model, args=training_arguments(tmp_path)).create_optimizer()
    groups = group_of_each_parameter(optimizer)
    assert groups[id(shared)]["lr"] == ENCODER_LR
    assert groups[id(model.verbalizer_head.dense.bias)]["lr"] == HEAD_LR


def test_without_head_learning_rate_the_optimizer_is_the_trainers_own(tmp_path):
    from transformers import Trainer

    args = training_arguments(tmp_path, head_learning_rate=None)
    ours = PMNERTrainer(model=tiny_model(), args=args).create_optimizer()
    theirs = Trainer(model=tiny_model(), args=args).create_optimizer()
    assert [(group["lr"], group["weight_decay"], len(group["params"])) for group in ours.param_groups] == [
        (group["lr"], group["weight_decay"], len(group["params"])) for group in theirs.param_groups
    ]


def test_one_step_moves_each_weight_by_its_groups_learning_rate(tmp_path):
    """The first AdamW step moves a weight by its learning rate (m / sqrt(v) is the gradient's sign)."""
    model = tiny_model().train()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = training_arguments(
        tmp_path, max_steps=1, per_device_train_batch_size=8, weight_decay=0.0, max_grad_norm=0.0,
        lr_scheduler_type="constant", logging_strategy="no",
    )
    PMNERTrainer(model=model, args=args, train_dataset=Rows(accumulation_rows())).train()
    moved = {name: (value.detach() - before[name]).abs().max().item() for name, value in model.named_parameters()}
    encoder = ("pmner.text_model.encoder.layer.0.attention.self.query.weight",
               "pmner.text_model.embeddings.word_embeddings.weight")
    head = ("pmner.fusion.text_to_fused.query.weight", "pmner.visual_projection.weight", "verbalizer_head.dense.weight")
    for name in encoder:
        assert moved[name] == pytest.approx(ENCODER_LR, rel=0.01), name
    for name in head:
        assert moved[name] == pytest.approx(HEAD_LR, rel=0.01), name


def test_the_schedule_scales_each_groups_own_rate_and_the_logs_carry_both(tmp_path):
    args = training_arguments(
        tmp_path, max_steps=3, per_device_train_batch_size=4, lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=1,
    )
    trainer = PMNERTrainer(model=tiny_model().train(), args=args, train_dataset=Rows(accumulation_rows()))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    for entry in logged:  # linear decay from each group's own peak: step s runs at peak * (3 - (s - 1)) / 3
        assert entry["learning_rate"] == pytest.approx(ENCODER_LR * (4 - entry["step"]) / 3, abs=1e-12)
        assert entry["head_learning_rate"] == pytest.approx(HEAD_LR * (4 - entry["step"]) / 3, abs=1e-12)
    assert sorted({group["initial_lr"] for group in trainer.optimizer.param_groups}) == [ENCODER_LR, HEAD_LR]


# -- train_pmner.py ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_training_workspace(tmp_path_factory.mktemp("head-lr"))


def run_train(workspace, name, *extra):
    command = [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"),
        "--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"), "--text_only",
        "--text_model_name_or_path", str(workspace / "tiny-bert"), "--fusion_num_heads", "4",
        "--do_train", "--num_train_epochs", "1", "--use_cpu", "--report_to", "none",
        "--output_dir", str(workspace / "runs" / name), *extra,
    ]
    env = dict(os.environ, HF_HOME=str(workspace / "hf-home"), **ENV)
    return subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(workspace):
    result = run_train(workspace, "trained", "--learning_rate", "2e-5", "--head_learning_rate", "3e-3",
                       "--logging_steps", "1", "--warmup_steps", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    return workspace / "runs" / "trained"


def test_train_pmner_trains_the_added_layers_at_head_learning_rate(trained):
    state = json.loads((trained / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "learning_rate" in entry]
    assert logged, state["log_history"]
    for entry in logged:
        assert entry["head_learning_rate"] == pytest.approx(entry["learning_rate"] * 3e-3 / 2e-5)
    assert logged[0]["learning_rate"] == pytest.approx(2e-5)
    assert "2e-05 (text encoder), 0.003 (added layers" in (trained / "README.md").read_text()


def test_a_checkpoint_is_resumed_only_with_its_head_learning_rate(workspace, trained):
    from training_pmner.optimizer import saved_head_learning_rate

    checkpoints = sorted(trained.glob("checkpoint-*"))
    assert checkpoints and saved_head_learning_rate(str(checkpoints[-1])) == 3e-3
    result = run_train(workspace, "trained", "--learning_rate", "2e-5", "--head_learning_rate", "1e-3")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"train_pmner.py: error: checkpoint {checkpoints[-1]} was trained with --head_learning_rate 0.003; this run "
        "asks for 0.001 (resume with the same, or start over in another --output_dir)"
    )


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("train_pmner.py: error: "), lines
    return lines[0]


def refused_in_process(capsys, argv) -> str:
    """train_pmner.main in this process (the checks that run before any model loads), as a subprocess would."""
    import train_pmner

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_pmner.main([str(item) for item in argv])
    captured = capsys.readouterr()
    return one_line_error(subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err))


@pytest.mark.parametrize(
    "value, message",
    [
        ("nan", "--head_learning_rate must be a positive finite number, got nan"),
        ("abc", "argument --head_learning_rate/--head-learning-rate: invalid float value: 'abc'"),
    ],
    ids=["nan", "word"],
)
def test_a_head_learning_rate_that_is_not_a_number_is_refused(workspace, value, message):
    line = one_line_error(run_train(workspace, "refused", f"--head_learning_rate={value}"))
    assert line == f"train_pmner.py: error: {message}"
    assert not (workspace / "runs" / "refused" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "value, shown", [("0", "0.0"), ("-1", "-1.0"), ("inf", "inf")], ids=["zero", "negative", "inf"]
)
def test_a_head_learning_rate_that_is_not_positive_and_finite_is_refused(workspace, monkeypatch, capsys, value, shown):
    for name, setting in ENV.items():
        monkeypatch.setenv(name, setting)
    line = refused_in_process(capsys, [
        "--dataset_name", "twitter2017", "--data_dir", workspace / "data", "--text_only",
        "--text_model_name_or_path", workspace / "tiny-bert", "--do_train", "--use_cpu",
        "--output_dir", workspace / "runs" / "refused-number", f"--head_learning_rate={value}",
    ])
    assert line == f"train_pmner.py: error: --head_learning_rate must be a positive finite number, got {shown}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("head_learning_rate: 0\n", "--head_learning_rate must be a positive finite number, got 0.0"),
        ("head_learning_rate: -.inf\n", "--head_learning_rate must be a positive finite number, got -inf"),
        ("head_learning_rate: .nan\n", "--head_learning_rate must be a positive finite number, got nan"),
        ("head_learning_rate: abc\n",
         "{file}: head_learning_rate: 'abc' is not valid here (could not convert string to float: 'abc')"),
        ("head_learning_rate: [0.001]\n", "{file}: head_learning_rate: expected a number, got [0.001] (list)"),
    ],
    ids=["zero", "minus-inf", "nan", "word", "list"],
)
def test_an_argument_file_head_learning_rate_is_checked(workspace, monkeypatch, capsys, text, message):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = workspace / "head-lr.yaml"
    path.write_text(text)
    line = refused_in_process(capsys, [
        path, "--dataset_name", "twitter2017", "--data_dir", workspace / "data", "--text_only",
        "--text_model_name_or_path", workspace / "tiny-bert", "--do_train", "--use_cpu",
        "--output_dir", workspace / "runs" / "refused-file",
    ])
    assert line == "train_pmner.py: error: " + message.replace("{file}", str(path))


def test_head_learning_rate_with_an_optimizer_of_its_own_groups_is_refused(workspace, monkeypatch, capsys):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    line = refused_in_process(capsys, [
        "--dataset_name", "twitter2017", "--data_dir", workspace / "data", "--text_only",
        "--text_model_name_or_path", workspace / "tiny-bert", "--do_train", "--use_cpu",
        "--output_dir", workspace / "runs" / "refused-optim", "--head_learning_rate", "1e-3", "--optim", "lomo",
    ])
    assert line == (
        "train_pmner.py: error: --head_learning_rate needs an optimizer that takes parameter groups; --optim lomo "
        "builds its own"
    )
