"""Layer 7, interop: exporting trained models (jax.export, msgpack, safetensors, SavedModel)."""
