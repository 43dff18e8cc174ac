"""TFDS builders that ship with vit_jax; importing this package registers them with TFDS."""
from vit_jax.datasets.cluttered_digits import ClutteredDigits
from vit_jax.datasets.digits import Digits

__all__ = ['ClutteredDigits', 'Digits']
