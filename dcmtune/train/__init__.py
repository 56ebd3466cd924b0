"""Training: typed hyper-parameters (`hparams`), the TrainState and its pure jitted steps
(`step`), the data feed (`feed`), the fit loop (`loop`), checkpoints and exact restarts
(`checkpoints`, `restart`), fine-tuning from another model's weights (`finetune`), programs
kept across processes (`programs`), the process environment (`environment`), TensorBoard and
MLflow/W&B reporters (`tensorboard`, `tracking`); `python -m dcmtune.train` (`commands`).
docs/architecture.md.

Import from the modules: this face stays empty so that the light ones (environment, tracking)
load without JAX (the sweep driver uses them).
"""
