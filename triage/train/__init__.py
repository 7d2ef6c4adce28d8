"""Stage train: LoRA adapters, the objectives, the batches and the training loop."""
