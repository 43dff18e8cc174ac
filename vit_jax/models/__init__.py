"""Vision Transformer model zoo: `create_model(name, num_classes=...)` and `list_models()`.

Importing this package registers every family.
"""
from vit_jax.models import ast  # noqa: F401  (registers ast_*)
from vit_jax.models import beit  # noqa: F401  (registers beit_*)
from vit_jax.models import cait  # noqa: F401  (registers cait_*)
from vit_jax.models import convnext  # noqa: F401  (registers convnext_*)
from vit_jax.models import cvt  # noqa: F401  (registers cvt_*)
from vit_jax.models import deit  # noqa: F401  (registers deit_*)
from vit_jax.models import dino  # noqa: F401  (registers dino_vit_*)
from vit_jax.models import efficientformer  # noqa: F401  (registers efficientformer_*, efficientformerv2_*)
from vit_jax.models import efficientvit_mit  # noqa: F401  (registers efficientvit_b*)
from vit_jax.models import efficientvit_msra  # noqa: F401  (registers efficientvit_m*)
from vit_jax.models import fastvit  # noqa: F401  (registers fastvit_*)
from vit_jax.models import frame_average  # noqa: F401  (registers vit_frames_*)
from vit_jax.models import levit  # noqa: F401  (registers levit_*)
from vit_jax.models import mae  # noqa: F401  (registers mae_vit_*)
from vit_jax.models import maxvit  # noqa: F401  (registers maxvit_*)
from vit_jax.models import mixer  # noqa: F401  (registers mixer_*)
from vit_jax.models import mobilevit  # noqa: F401  (registers mobilevit_*, mobilevitv2_*)
from vit_jax.models import mvitv2  # noqa: F401  (registers mvitv2_*)
from vit_jax.models import pvt_v2  # noqa: F401  (registers pvt_v2_*)
from vit_jax.models import swin  # noqa: F401  (registers swin_*, swinv2_*)
from vit_jax.models import timesformer  # noqa: F401  (registers timesformer_*)
from vit_jax.models import vit  # noqa: F401  (registers vit_*)
from vit_jax.models import vivit  # noqa: F401  (registers vivit_*)
from vit_jax.models import xcit  # noqa: F401  (registers xcit_*)
from vit_jax.models.registry import ModelSpec, create_model, get_model_spec, list_models, register_model

__all__ = ['ModelSpec', 'create_model', 'get_model_spec', 'list_models', 'register_model']
