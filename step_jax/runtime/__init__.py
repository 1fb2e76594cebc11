"""Layer 0, runtime: device meshes and shardings, metric writers, checkpoint files and the
workdir's config.json. Knows nothing about models or data."""
