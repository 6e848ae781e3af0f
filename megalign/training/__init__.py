"""Training: the trainer loop, optimizer, learning-rate schedules, loss scaling and checkpoints."""
