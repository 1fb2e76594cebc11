"""Layer 4, training: losses, optimizers, the sharded train loop with checkpoint resume and
periodic evaluation, and the dCTS policy trainer."""
