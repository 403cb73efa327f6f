"""unified_mm: JAX/TPU training of unified multimodal models (Harmon, VQRAE) with Flax NNX."""

from flax import nnx as _nnx

# Shardings come from jit out_shardings resolved through the config's logical-axis rules, never
# from eager placement at Variable creation (jax_scaling.md 2.4: the flag is pytree metadata, so
# the whole program uses one mode).
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
