"""Full-size logit parity against timm with random weights (a measurement script, not a test; needs torch + timm).

    PYTHONPATH=. python tests/parity/measure_fullsize.py [our_model_name ...]

Builds the timm model, randomises its weights as make_fixtures.py does, converts them with
`vit_jax.convert.timm_to_params`, and prints the max |logit diff| on one random 224 px image (float32 both sides).
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
    ('convnext_tiny', 'convnext_t', {}),
    ('cait_xxs24_224', 'cait_xxs24', {}),
    ('beit_base_patch16_224', 'beit_b16', {}),
]


def main(argv: list[str]) -> None:
  make_fixtures._import_timm()  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  from vit_jax.models import create_model, get_model_spec  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  f64 = '--f64' in argv
  names = [a for a in argv if not a.startswith('--')]
  for tname, name, overrides in CASES:
    if names and name not in names:
      continue
    t0 = time.time()
    size = get_model_spec(name).image_size
    tm = timm.create_model(tname, pretrained=False, num_classes=1000).eval()
    make_fixtures._randomize(tm, 0)  # pylint: disable=protected-access
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    ref = tm(torch.from_numpy(x)).numpy()
    params = convert.timm_to_params(name, {k: v.numpy() for k, v in tm.state_dict().items()},
                                    model_overrides=overrides)
    model = create_model(name, num_classes=1000, **overrides)
    got = np.asarray(jax.jit(model.apply)({'params': params}, x.transpose(0, 2, 3, 1)))
    line = (f'{name} ({tname}) {size}px: max|logit diff| {np.abs(got - ref).max():.2e} '
            f'(|logits| max {np.abs(ref).max():.2f})')
    if f64:
      ref64 = copy.deepcopy(tm).double()(torch.from_numpy(x).double()).numpy()
      line += f'; vs timm float64: timm f32 {np.abs(ref - ref64).max():.2e}, ours {np.abs(got - ref64).max():.2e}'
    print(f'{line} [{time.time() - t0:.0f}s]', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
