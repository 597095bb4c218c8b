"""The Trainer of `train_pmner.py`: the Trainer's own optimizer, with the layers P-MNER adds on a learning rate of
their own (`--head_learning_rate`) beside the pretrained text encoder's (`--learning_rate`)."""

import json
import os

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from .errors import ArgumentsError


# --optim values whose optimizer does not take the Trainer's parameter groups (it builds its own, per layer or
# per parameter), so that no group of them can be given another learning rate
UNGROUPED_OPTIMIZERS = ("galore", "apollo", "lomo", "adalomo")


def ungrouped_optimizer(optim) -> bool:
    name = str(getattr(optim, "value", optim)).lower()
    return name.startswith(UNGROUPED_OPTIMIZERS)


def text_encoder_of(model: nn.Module) -> nn.Module:
    """The pretrained text encoder of a P-MNER model (`PMNERModel.text_model`)."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "text_model", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"--head_learning_rate: {type(model).__name__} has no P-MNER text encoder (text_model)")
    return encoder


def encoder_parameter_ids(model: nn.Module) -> set[int]:
    """Identities of the text encoder's parameters. A weight the head shares with the encoder (the word embeddings
    that the verbalizer reads its label words from) is the encoder's."""
    return {id(parameter) for parameter in text_encoder_of(model).parameters()}


def split_parameter_groups(
    groups: list[dict], model: nn.Module, head_learning_rate: float
) -> tuple[list[dict], list[dict]]:
    """Splits each of the Trainer's parameter groups (weight decay / none, with their options) into its encoder
    part and its head part: the encoder parts, in the Trainer's order (the Trainer logs the learning rate of group
    0, so they come first in the optimizer), and the head parts on `head_learning_rate`. Empty parts are left out."""
    encoder_ids = encoder_parameter_ids(model)
    encoder_groups, head_groups = [], []
    for group in groups:
        options = {key: value for key, value in group.items() if key != "params"}
        encoder = [parameter for parameter in group["params"] if id(parameter) in encoder_ids]
        head = [parameter for parameter in group["params"] if id(parameter) not in encoder_ids]
        if encoder:
            encoder_groups.append({**options, "params": encoder})
        if head:
            head_groups.append({**options, "params": head, "lr": head_learning_rate})
    return encoder_groups, head_groups


class HeadLearningRateCallback(TrainerCallback, ExportableState):
    """Reads the head's learning rate after each optimizer step, before the scheduler moves it: the rate that step
    used, as the Trainer's own `learning_rate` log is. Checkpoints record `head_learning_rate` (in
    trainer_state.json), which a resumed run must repeat: the optimizer state holds one group per rate."""

    def __init__(self, head_learning_rate: float | None = None):
        self.head_learning_rate = head_learning_rate
        self.rates = None  # each optimizer group's rate in the last step

    def state(self) -> dict:
        return {"args": {"head_learning_rate": self.head_learning_rate}, "attributes": {}}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.rates = [group["lr"] for group in optimizer.param_groups]


class PMNERTrainer(Trainer):
    """`Trainer` whose optimizer puts every parameter outside the pretrained text encoder (the fusion layers, the
    visual projection, the prompt head with its masked-LM transform, or the linear classifier) on
    `args.head_learning_rate` when it is set. The Trainer builds its optimizer and groups as always (weight decay
    but none on biases and LayerNorms); each group is then split in two, and the scheduler scales each group's own
    learning rate. Training logs carry `head_learning_rate` beside `learning_rate` (the encoder's)."""

    head_group_index = None  # the first head group of the optimizer, once split

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(HeadLearningRateCallback(getattr(self.args, "head_learning_rate", None)))

    def create_optimizer(self, model=None):
        building = self.optimizer is None
        optimizer = super().create_optimizer(model)
        head_learning_rate = getattr(self.args, "head_learning_rate", None)
        if not building or head_learning_rate is None:
            return optimizer
        opt_model = self.model if model is None else model
        trainable = {id(parameter) for parameter in opt_model.parameters() if parameter.requires_grad}
        grouped = [id(parameter) for group in optimizer.param_groups for parameter in group["params"]]
        if ungrouped_optimizer(self.args.optim) or sorted(grouped) != sorted(trainable):
            raise ValueError(
                f"--head_learning_rate needs an optimizer built on the Trainer's parameter groups; --optim "
                f"{getattr(self.args.optim, 'value', self.args.optim)} builds its own"
            )
        encoder_groups, head_groups = split_parameter_groups(optimizer.param_groups, opt_model, head_learning_rate)
        optimizer.param_groups = []
        for group in encoder_groups + head_groups:
            optimizer.add_param_group(group)  # refuses a parameter in two groups
        self.head_group_index = len(encoder_groups) if head_groups else None
        return optimizer

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # the callback is looked up each time: resuming with restore_callback_states_from_checkpoint replaces it
        recorders = [item for item in self.callback_handler.callbacks if isinstance(item, HeadLearningRateCallback)]
        recorder = recorders[0] if recorders else None
        if "learning_rate" in logs and self.head_group_index is not None and recorder and recorder.rates:
            logs["head_learning_rate"] = recorder.rates[self.head_group_index]
        super().log(logs, *args, **kwargs)


def saved_head_learning_rate(checkpoint: str) -> float | None:
    """The --head_learning_rate a checkpoint was trained with (`None`: not given, or a checkpoint that does not say)."""
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
        callbacks = json.load(handle).get("stateful_callbacks") or {}
    record = callbacks.get(HeadLearningRateCallback.__name__) or {}
    if isinstance(record, list):  # the Trainer keeps a list when a callback class is there more than once
        record = record[0] if record else {}
    return (record.get("args") or {}).get("head_learning_rate")


def check_same_head_learning_rate(checkpoint: str, training_args) -> None:
    """Resuming restores the checkpoint's optimizer and scheduler, whose groups and rates follow the
    --head_learning_rate it was trained with: another one would fail to load, or be ignored."""
    saved, wanted = saved_head_learning_rate(checkpoint), getattr(training_args, "head_learning_rate", None)
    if saved != wanted:
        def shown(value):
            return "not given" if value is None else str(value)

        raise ArgumentsError(
            f"checkpoint {checkpoint} was trained with --head_learning_rate {shown(saved)}; this run asks for "
            f"{shown(wanted)} (resume with the same, or start over in another --output_dir)"
        )


__all__ = [
    "HeadLearningRateCallback",
    "PMNERTrainer",
    "check_same_head_learning_rate",
    "encoder_parameter_ids",
    "saved_head_learning_rate",
    "split_parameter_groups",
    "text_encoder_of",
]
