"""Support code of `train_pmner.py`, one concern per module:

- `arguments`: the dataclass arguments, the parser and argument files; `argument_checks`: the refusals of arguments.
- `checks`: the refusals that need the run's folders, a checkpoint, the text model or the data.
- `data`: where the text model and the data come from, batch collation, visual statistics; `twitter_mner`: the
  Twitter MNER `datasets` builder (`twitter_mner_hub`: its Hub export); `context_files` and `context`: auxiliary
  context; `features_dataset`: shareable FRR features (`features_dataset_io`: their files).
- `optimizer`: the Trainer with `--head_learning_rate`; `callbacks`: Trainer callbacks; `checkpoints`: checked and
  set-aside checkpoints; `seqeval_metric`: entity-level scores; `errors`: how a stopped run is told.
- `publishing`: what a finished run publishes: results files, the model card and the Hub upload.

Not remote code: nothing here is copied into saved model folders.
"""
