"""Distributed training on Ray Train (V2, DDP), tracked in MLflow."""
