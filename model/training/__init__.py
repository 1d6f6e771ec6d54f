"""Training: the shared loop helpers (checkpoints, logging, distributed), the VAE and DiT trainers and the DiT dataset preparation."""
