"""Regenerates the MaxViT timm parity fixtures used by tests/test_maxvit.py (needs torch + timm; the tests do not).

    python tests/parity/make_maxvit_fixtures.py [maxvit maxvit_tf]

Two tiny configurations of timm's `MaxxVit` (block type 'M', NormMlpClassifierHead): two stages at 32 px with 2x2
partitions (window_size 2), stem map 16, stage maps 8 and 4 (grid strides 4 and 2):
  maxvit     timm's MaxxVitCfg defaults = our maxvit_t numerics (symmetric padding, BatchNorm eps 1e-5, LayerNorm
             eps 1e-6, exact GELU, per-head qkv, Swin-style bias table);
  maxvit_tf  timm's `_tf_cfg()` = our maxvit_*_tf_224 numerics (TF SAME padding, BN eps 1e-3, LN eps 1e-5, tanh
             GELU, [q | k | v] qkv, (heads, 2P-1, 2P-1) bias table).
Stage 0 keeps the stem width (its strided MBConv shortcut is a pool without the 1x1 conv); stage 1 widens (pool +
1x1 conv) and has a second, unstrided block (identity shortcut). head_hidden_size differs from the last width. Every parameter is randomised, and so are the
BatchNorm running statistics (mean N(0, 0.2), var U(0.5, 1.5)), so eval-mode BatchNorm is checked with non-trivial
statistics. Files, as make_fixtures.py: {name}.safetensors (timm state dict), {name}.npz (input_nhwc, logits),
{name}.json (timm config, our model name and overrides).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top

OUT_DIR = make_fixtures.OUT_DIR
NUM_CLASSES = 5
SIZE = 32
WINDOW = 2
_ARCH = dict(embed_dim=(16, 24), depths=(1, 2), stem_width=16, head_hidden_size=20)
_OURS = dict(embed_dim=(16, 24), depths=(1, 2), stem_width=16, head_hidden_size=20, dim_head=8, window_size=WINDOW,
             drop_path_rate=0.0)
# name: (timm MaxxVitCfg extras: True for timm's _tf_cfg(), our registry name, our overrides)
CONFIGS = {
    'maxvit': (False, 'maxvit_t', _OURS),
    'maxvit_tf': (True, 'maxvit_t_tf_224', _OURS),
}


def timm_maxvit(tf: bool, **kwargs):
  """timm's MaxxVit for the tiny architecture: MaxxVitCfg defaults, or with timm's _tf_cfg() numerics."""
  from timm.models import maxxvit  # pylint: disable=g-import-not-at-top
  extra = maxxvit._tf_cfg() if tf else {}  # pylint: disable=protected-access
  cfg = maxxvit.MaxxVitCfg(block_type=('M',) * len(_ARCH['depths']), stem_bias=True, **_ARCH, **extra)
  return maxxvit.MaxxVit(cfg, transformer_dim_head=8, transformer_window_size=WINDOW, **kwargs), cfg


def randomize(model, seed: int) -> None:
  """Every parameter and BatchNorm running statistic random (norm weights around 1)."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  norms = tuple(n for n, m in model.named_modules()
                if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)))
  with torch.no_grad():
    for name, p in model.named_parameters():
      module = name.rsplit('.', 1)[0]
      if module in norms:
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 0.15))
    make_fixtures.randomize_running_stats(model, g)


def make(name: str, seed: int = 0) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  tf, model, overrides = CONFIGS[name]
  torch.manual_seed(seed)
  tmodel, cfg = timm_maxvit(tf, img_size=SIZE, num_classes=NUM_CLASSES)
  tmodel.eval()
  randomize(tmodel, seed)
  x = np.random.default_rng(seed).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
  with torch.no_grad():
    logits = tmodel(torch.from_numpy(x)).numpy()
  sd = {k: v.detach().contiguous().clone() for k, v in tmodel.state_dict().items()}
  base = os.path.join(OUT_DIR, name)
  save_file(sd, base + '.safetensors')
  np.savez(base + '.npz', input_nhwc=x.transpose(0, 2, 3, 1), logits=logits)
  meta = dict(timm_class='timm.models.maxxvit.MaxxVit', timm_cfg=dataclasses.asdict(cfg),
              timm_kwargs=dict(img_size=SIZE, num_classes=NUM_CLASSES, transformer_dim_head=8,
                               transformer_window_size=WINDOW),
              timm_version=__import__('timm').__version__, torch_version=torch.__version__, seed=seed, model=model,
              model_overrides=overrides, image_size=SIZE, num_classes=NUM_CLASSES)
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
