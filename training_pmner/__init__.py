"""Support code of `train_pmner.py`: its arguments (`arguments`), data collation and visual statistics (`data`),
and what a finished run publishes: results files, the model card and the Hub upload (`publishing`).

Not remote code: nothing here is copied into saved model folders.
"""
