"""Full-size logit parity against timm with random weights (a measurement script, not a test; needs torch + timm).

    PYTHONPATH=. python tests/parity/measure_fullsize.py [our_model_name ...]

Builds the timm model (transformers' for CvT, converted from the 'hf' layout), randomises its weights as
make_fixtures.py does and its BatchNorm running statistics, converts them with `vit_jax.convert.timm_to_params`,
and prints the max |logit diff| on one random 224 px image (float32 both sides); for families that fold for
deployment (FamilyFacts.fold) also the folded model's diff.
With --f64 it also prints how far timm's float32 logits and ours are from timm in float64 (random, untrained weights
amplify rounding, so this floor can exceed 1e-4 at full size).
"""
from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top

CASES = [  # timm name, our name, create_model overrides for timm's numerics
    ('vit_base_patch16_224', 'vit_b16', dict(gelu_approximate=False)),
    ('deit_small_distilled_patch16_224', 'deit_s16_distilled', {}),
    ('mixer_b16_224', 'mixer_b16', dict(gelu_approximate=False)),
    ('swin_tiny_patch4_window7_224', 'swin_t', {}),
    ('swinv2_tiny_window8_256', 'swinv2_t', {}),
    ('vit_tiny_r_s16_p8_224', 'r_vit_ti16', dict(gelu_approximate=False, resnet_norm_style='timm')),
    ('vit_small_r26_s32_224', 'r26_vit_s32', dict(gelu_approximate=False, resnet_norm_style='timm')),
    ('vit_base_r50_s16_224', 'r50_vit_b16', dict(gelu_approximate=False, resnet_norm_style='timm')),
    ('pvt_v2_b0', 'pvt_v2_b0', {}),
    ('pvt_v2_b2_li', 'pvt_v2_b2_li', {}),
    ('mvitv2_tiny', 'mvitv2_t', {}),
    ('xcit_tiny_12_p16_224', 'xcit_t12_p16', {}),
    ('xcit_small_12_p8_224', 'xcit_s12_p8', {}),
    ('xcit_medium_24_p16_224', 'xcit_m24_p16', {}),
    ('convnext_tiny', 'convnext_t', {}),
    ('cait_xxs24_224', 'cait_xxs24', {}),
    ('beit_base_patch16_224', 'beit_b16', {}),
    ('maxvit_tiny_tf_224', 'maxvit_t_tf_224', {}),
    ('levit_128s', 'levit_128s', {}),
    ('levit_384', 'levit_384', {}),
    ('efficientvit_m0', 'efficientvit_m0', {}),
    ('efficientvit_m5', 'efficientvit_m5', {}),
    ('fastvit_t8', 'fastvit_t8', {}),
    ('fastvit_sa12', 'fastvit_sa12', {}),
    ('mobilevit_xxs', 'mobilevit_xxs', {}),
    ('mobilevit_s', 'mobilevit_s', {}),
    ('mobilevitv2_050', 'mobilevitv2_050', {}),
    ('mobilevitv2_200', 'mobilevitv2_200', {}),
    ('efficientformer_l1', 'efficientformer_l1', {}),
    ('efficientformerv2_s0', 'efficientformerv2_s0', {}),
    ('efficientvit_b0', 'efficientvit_b0', {}),
]
# Families whose reference is not timm: (reference, our name, the builder of the randomised reference model, layout).
OTHER_CASES = [
    ('transformers CvtForImageClassification (microsoft/cvt-13)', 'cvt_13', '_hf_cvt', 'hf'),
    ('transformers CvtForImageClassification (microsoft/cvt-21)', 'cvt_21', '_hf_cvt', 'hf'),
    ('timm MaxxVit, maxvit_tiny_tf_224 cfg with MaxxVitCfg default numerics', 'maxvit_t', '_timm_maxvit_pytorch',
     'timm'),
]


def _hf_cvt(name: str):
  """transformers' CvT with the configuration of registry model `name` (1000 classes)."""
  from transformers import CvtConfig, CvtForImageClassification  # pylint: disable=g-import-not-at-top
  from vit_jax.models import get_model_spec  # pylint: disable=g-import-not-at-top
  kw = get_model_spec(name).kwargs
  return CvtForImageClassification(CvtConfig(
      num_labels=1000, embed_dim=list(kw['embed_dims']), depth=list(kw['depths']), num_heads=list(kw['num_heads'])))


def _timm_maxvit_pytorch(name: str):
  """timm's paper MaxViT of registry model `name` with PyTorch numerics (timm's MaxxVitCfg defaults instead of
  its _tf_cfg(): symmetric padding, BN eps 1e-5, LN eps 1e-6, exact GELU, per-head qkv, Swin-style table)."""
  import timm  # pylint: disable=g-import-not-at-top
  size = {'maxvit_t': 'tiny', 'maxvit_s': 'small', 'maxvit_b': 'base'}[name]
  return timm.create_model(f'maxvit_{size}_tf_224', pretrained=False, num_classes=1000, conv_padding='',
                           conv_norm_eps=1e-5, conv_act_layer='gelu', transformer_norm_eps=1e-6,
                           transformer_act_layer='gelu', transformer_head_first=True, transformer_rel_pos_type='bias')


def _randomize_with_stats(model, seed: int) -> None:
  """make_fixtures' randomisation plus random BatchNorm running statistics (so converted batch_stats matter)."""
  import torch  # pylint: disable=g-import-not-at-top
  make_fixtures._randomize(model, seed)  # pylint: disable=protected-access
  with torch.no_grad():
    make_fixtures.randomize_running_stats(model, torch.Generator().manual_seed(seed + 1))


def main(argv: list[str]) -> None:
  make_fixtures._import_timm()  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top
  from vit_jax.models import facts  # pylint: disable=g-import-not-at-top
  from vit_jax.models import create_model, get_model_spec  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  f64 = '--f64' in argv
  names = [a for a in argv if not a.startswith('--')]
  cases = [(tname, name, overrides, lambda t=tname: timm.create_model(t, pretrained=False, num_classes=1000),
            'timm') for tname, name, overrides in CASES]
  cases += [(ref, name, {}, lambda n=name, b=builder: globals()[b](n), layout)
            for ref, name, builder, layout in OTHER_CASES]
  for tname, name, overrides, build, layout in cases:
    if names and name not in names:
      continue
    t0 = time.time()
    size = get_model_spec(name).image_size
    tm = build().eval()
    _randomize_with_stats(tm, 0)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    ref = _logits(tm(torch.from_numpy(x)))
    variables = convert.timm_to_params(name, {k: v.numpy() for k, v in tm.state_dict().items()}, layout=layout,
                                       model_overrides=overrides)
    variables = variables if 'params' in variables else {'params': variables}  # BatchNorm models: + batch_stats.
    model = create_model(name, num_classes=1000, **overrides)
    got = np.asarray(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1)))
    line = (f'{name} ({tname}) {size}px: max|logit diff| {np.abs(got - ref).max():.2e} '
            f'(|logits| max {np.abs(ref).max():.2f})')
    if facts.get_family(get_model_spec(name).family).fold is not None:
      folded_model, folded = deploy.fold_for_inference(name, variables, num_classes=1000, **overrides)
      folded_logits = np.asarray(jax.jit(folded_model.apply)(folded, x.transpose(0, 2, 3, 1)))
      line += f', folded {np.abs(folded_logits - ref).max():.2e}'
    if f64:
      ref64 = _logits(copy.deepcopy(tm).double()(torch.from_numpy(x).double()))
      line += f'; vs timm float64: timm f32 {np.abs(ref - ref64).max():.2e}, ours {np.abs(got - ref64).max():.2e}'
    print(f'{line} [{time.time() - t0:.0f}s]', flush=True)


def _logits(out):
  """timm returns logits; transformers an output object holding them."""
  return (out.logits if hasattr(out, 'logits') else out).numpy()


if __name__ == '__main__':
  main(sys.argv[1:])
