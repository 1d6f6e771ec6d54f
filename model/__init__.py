"""The Direct3D-S2 model: sparse tensors and layers (:mod:`model.sparse`), the sparse SDF VAE (:mod:`model.nets.vae`),
data (mesh -> sparse SDF) and metrics.

Kept light on purpose: import the submodule you need (``from model.nets.vae import SparseSDFVAE``).
"""
