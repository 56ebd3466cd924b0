"""dcmtune: train and hyper-parameter-sweep DCMNet models (JAX/e3x, Ray Tune + Optuna)."""
