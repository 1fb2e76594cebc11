"""Layer 8, command line: `python -m step_jax.cli.<train|evaluate|benchmark|flops|profile|
export|train_policy>`. Each module is flags in, one library call, result out."""
