"""Networks of the released model: the SSA layer, the sparse DiT, the sparse SDF VAE, the dense stage, the refiners and the image encoder."""
