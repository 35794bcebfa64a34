"""Pretraining: streaming pipeline (data/), models (models/), losses, DeepSpeed engine, configs."""
