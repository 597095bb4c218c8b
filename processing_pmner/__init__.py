"""P-MNER processing (FRR image processor and prompt-template tokenizer)."""
