"""What train.json adds to MONAI's SupervisedTrainer: per-region validation views and the CPU memory layout."""
