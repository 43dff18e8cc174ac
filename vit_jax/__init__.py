"""vit_jax: Vision Transformers and their hierarchical variants in JAX/Flax."""
__version__ = '0.1.0'
