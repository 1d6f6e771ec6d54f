"""The released image-to-mesh cascade (``cascade``) and what it is built from: input images (``images``), mesh <->
voxel geometry (``geometry``), mesh extraction (``extract``), released checkpoints (``pretrained``,
``released_config``), random weights (``random_weights``), stage records (``records``), VAE reconstruction and
evaluation (``reconstruct``) and previews (``preview``)."""
