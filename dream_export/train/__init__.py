"""Drafter training: self-distillation data, cached target features, losses and the training loop."""
