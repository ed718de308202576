"""rpo inside other training libraries. Each integration is an optional extra, imported only when used:

    rpo.integrations.trl   `pip install 'rpo[trl]'`: RPOTrainer, a drop-in for TRL's DPOTrainer whose loss is any
                           rpo.losses spec (docs/trl.md)

The core package never imports these modules, so it keeps no dependency on the libraries they integrate with.
"""
