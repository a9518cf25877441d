"""Fine-tuning: data, the training process, checkpoints, export (see job.py)."""
