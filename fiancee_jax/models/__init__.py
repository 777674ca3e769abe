"""Models: OASIS generator / discriminator, shared layers (SPADE, spectral norm), MegaPortraits.

Variable collections: 'params', 'batch_stats' (sync BN running stats) and 'spectral'
(spectral-norm u, v); train-mode `apply` needs `mutable=list(layers.MUTABLE)`.
"""
