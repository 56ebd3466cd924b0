"""The model: DCMNet (flax.linen + e3x), the physics of its charges (ESP, dipole), and the loss
terms and metric sums (docs/architecture.md).

Import from the modules (`dcmtune.model.dcmnet`, `.physics`, `.loss`): this face stays empty so
that the loss and physics load without e3x (a warm trainer process never imports it).
"""
