"""Regenerates the LeViT and EfficientViT-M (MSRA) timm parity fixtures used by tests/test_levit_efficientvit.py
(needs torch + timm; the tests do not).

    python tests/parity/make_levit_efficientvit_fixtures.py [levit efficientvit_m]

Tiny configurations of timm's classes:
  levit          (32 px, batch 2) LevitDistilled, embed_dim (16, 24), key_dim 8, heads (2, 3), one block per stage, timm's stride-8
                 stem (stem_type 's8' = our patch_size 8, three convs): map 4x4, attention downsampling to 2x2,
                 both heads (head, head_dist);
  efficientvit_m (48 px, batch 1) EfficientVitMsra, embed_dim (16, 24, 32), key_dim 4, heads (2, 2, 2), depth
                 (1, 1, 1), windows (2, 2, 2), kernels (5, 3): maps 3, 2, 1; stage 0 pads its 3x3 map to four 2x2
                 windows (partition, zero padding, crop), the later stages attend in one window each.
Every parameter is randomised (norm weights around 1, attention-bias tables included), and so are the BatchNorm
running statistics (make_fixtures.randomize_running_stats), so eval-mode BatchNorm is checked with non-trivial
statistics. Files, as make_fixtures.py: {name}.safetensors (timm state dict), {name}.npz (input_nhwc, logits),
{name}.json (timm class + kwargs, our model name and overrides).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top

OUT_DIR = make_fixtures.OUT_DIR
NUM_CLASSES = 5
SIZES = {'levit': (32, 2), 'efficientvit_m': (48, 1)}  # name: (image size, batch)
# name: (timm module, class, timm kwargs, our registry name, our overrides)
CONFIGS = {
    'levit': ('timm.models.levit', 'LevitDistilled',
              dict(embed_dim=(16, 24), key_dim=8, num_heads=(2, 3), depth=(1, 1), stem_type='s8'),
              'levit_128s', dict(embed_dim=(16, 24), key_dim=8, num_heads=(2, 3), depth=(1, 1), patch_size=8,
                                 drop_path_rate=0.0)),
    'efficientvit_m': ('timm.models.efficientvit_msra', 'EfficientVitMsra',
                       dict(embed_dim=(16, 24, 32), key_dim=(4, 4, 4), num_heads=(2, 2, 2), depth=(1, 1, 1),
                            window_size=(2, 2, 2), kernels=(5, 3)),
                       'efficientvit_m0', dict(embed_dim=(16, 24, 32), key_dim=(4, 4, 4), num_heads=(2, 2, 2),
                                               depth=(1, 1, 1), window_size=(2, 2, 2), kernels=(5, 3),
                                               drop_path_rate=0.0)),
}


def randomize(model, seed: int) -> None:
  """Every parameter and BatchNorm running statistic random (norm weights around 1)."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  norms = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))  # pylint: disable=protected-access
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.rsplit('.', 1)[0] in norms:
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 0.15))
    make_fixtures.randomize_running_stats(model, g)


def make(name: str, seed: int = 0) -> None:
  import importlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  module, cls_name, tkw, model, overrides = CONFIGS[name]
  size, batch = SIZES[name]
  torch.manual_seed(seed)
  tmodel = getattr(importlib.import_module(module), cls_name)(img_size=size, num_classes=NUM_CLASSES, **tkw)
  tmodel.eval()
  randomize(tmodel, seed)
  x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    logits = tmodel(torch.from_numpy(x)).numpy()
  sd = {k: v.detach().contiguous().clone() for k, v in tmodel.state_dict().items()}
  base = os.path.join(OUT_DIR, name)
  save_file(sd, base + '.safetensors')
  np.savez(base + '.npz', input_nhwc=x.transpose(0, 2, 3, 1), logits=logits)
  meta = dict(timm_class=f'{module}.{cls_name}', timm_kwargs=dict(img_size=size, num_classes=NUM_CLASSES, **tkw),
              timm_version=__import__('timm').__version__, torch_version=torch.__version__, seed=seed, model=model,
              model_overrides=overrides, image_size=size, num_classes=NUM_CLASSES)
  with open(base + '.json', 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True, default=list)
    f.write('\n')
  for ext in ('.safetensors', '.npz', '.json'):
    os.chmod(base + ext, 0o644)
  sizes = {ext: os.path.getsize(base + ext) for ext in ('.safetensors', '.npz', '.json')}
  print(f'{name}: {len(sd)} tensors, logits |max| {np.abs(logits).max():.3f}, bytes {sizes}')


def main() -> None:
  make_fixtures._import_timm()  # pylint: disable=protected-access
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  for name in sys.argv[1:] or list(CONFIGS):
    make(name)


if __name__ == '__main__':
  main()
