"""Trainer callbacks of `train_pmner.py` (the Hub pushes of `--hub_strategy` are `publishing.HubStrategyCallback`)."""

import logging
import time

from transformers import TrainerCallback


logger = logging.getLogger(__name__)


class EpochTimerCallback(TrainerCallback):
    """Logs the wall time of each epoch and the validation F1, so a CPU run shows that it is alive; warns when the
    warm-up covers every step (the learning rate would stay below its peak the whole run, 0 for a one-step run)."""

    def on_train_begin(self, args, state, control, **kwargs):
        warmup = args.get_warmup_steps(state.max_steps) if state.max_steps else 0
        if state.is_world_process_zero and state.max_steps and warmup >= state.max_steps:
            logger.warning(
                f"--warmup_steps {args.warmup_steps} gives {warmup} warm-up steps for a run of {state.max_steps} "
                "optimizer steps: the learning rate never reaches its peak (a one-step run does not change the "
                "weights). Pass fewer warm-up steps, or more data / epochs."
            )

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            logger.info(f"epoch {state.epoch:.2f} trained in {time.perf_counter() - self.start:.1f} s")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics and "eval_f1" in metrics:
            logger.info(
                f"epoch {state.epoch:.2f}: validation P {metrics['eval_precision']:.4f} "
                f"R {metrics['eval_recall']:.4f} F1 {metrics['eval_f1']:.4f}"
            )

