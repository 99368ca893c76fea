"""Evaluation tasks, one module each, every module ending with its `Task` record (see `record.py`)."""
