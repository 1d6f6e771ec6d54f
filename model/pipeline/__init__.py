"""The released image-to-mesh cascade: loading released weights, the cascade itself, mesh extraction, VAE reconstruction and previews."""
