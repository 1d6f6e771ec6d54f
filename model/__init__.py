"""The Direct3D-S2 model: sparse tensors and layers (:mod:`model.sparse`), the sparse SDF VAE (:mod:`model.vae`),
data (mesh -> sparse SDF) and metrics.

Kept light on purpose: import the submodule you need (``from model.vae import SparseSDFVAE``).
"""
