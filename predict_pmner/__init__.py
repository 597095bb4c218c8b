"""`pmner-predict`: tag tweets in files with a trained P-MNER model (`cli`), reading records (`reading`), tagging
them in batches (`predictor`), writing entities safely (`output`), one or several processes (`processes`);
`loading.load_pipeline` is the pipeline loader shared with the demo (`app.py`).

Not remote code: nothing here is copied into saved model folders.
"""
