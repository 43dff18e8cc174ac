"""Regenerates the timm parity fixtures used by tests/test_convert.py.

Needs torch and timm (NOT needed by the tests themselves):

    python tests/parity/make_fixtures.py

For a tiny configuration of each supported family it builds the timm model with fixed, randomised weights (the
zero-initialised parts such as the head, SwinV2 post-norms and biases are perturbed too, so that the comparison is
meaningful), runs a fixed input and writes, under tests/parity/fixtures/:

  {family}.safetensors  the timm state dict (float32)
  {family}.npz          'input_nhwc' (B, H, W, 3) and 'logits' (B, classes) from timm
  {family}.json         timm class + kwargs, and the vit_jax model name, create_model overrides and image size
  resize.npz            reference outputs of torch's bicubic resizing (Swin bias tables, ViT position grid)

Arguments: fixture names to regenerate (default: all), e.g. `python tests/parity/make_fixtures.py pvt_v2 resize`.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import types

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
NUM_CLASSES = 5
BATCH = 2  # 1 for the 64 px fixtures, to keep them small.


class _Anything(types.ModuleType):
  """Module stub whose attributes are further stubs (timm imports torchvision names it does not need here)."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    if name[:1].isupper():
      class _Meta(type):
        def __getattr__(cls, n):
          if n.startswith('__'):
            raise AttributeError(n)
          return n
      return _Meta(name, (), {})
    return _Anything(f'{self.__name__}.{name}')


class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, fullname, path, target=None):
    if fullname == 'torchvision' or fullname.startswith('torchvision.'):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    m = _Anything(spec.name)
    m.__path__ = []
    m.__version__ = '0.0'
    return m

  def exec_module(self, module):
    pass


def _import_timm():
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    sys.modules.pop('torchvision', None)
    sys.meta_path.insert(0, _StubTorchvision())
  import timm  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


_SWIN_TIMM = dict(embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4, patch_size=4)
_SWIN_OURS = dict(embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4, patch_size=4,
                  drop_path_rate=0.0)
# timm's hybrids differ from the official JAX code in the activation and in the stem's eps (both model options).
_HYBRID_OURS = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=64, classifier='token', gelu_approximate=False,
                    resnet_width=0.5, resnet_norm_style='timm')
_PVT = dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 24), num_heads=(1, 2, 2, 3))
_MVIT = dict(depths=(1, 2, 1, 1), embed_dim=(8, 16, 24, 32), num_heads=(1, 2, 3, 4))
_CONVNEXT = dict(depths=(1, 2, 1, 1), dims=(8, 16, 16, 24))
_CAIT = dict(embed_dim=32, depth=2, num_heads=4)
_BEIT = dict(embed_dim=32, depth=2, num_heads=4)
# family: (timm module, timm class, timm kwargs, vit_jax model, vit_jax overrides, image size)
# 32 px Swin: stage resolutions 8, 4, 2 with window 4 -> shifted windows in stage 0, a whole-map window in stage 1
# and a clamped window (timm's 3x3 v1 table, placed at the centre of our 7x7 one) in stage 2.
# Hybrids: timm's VisionTransformer + HybridEmbed on the ResNetV2 stem built exactly as timm's `_resnetv2`
# (StdConv2dSame eps 1e-8, 'same' stem, no pre-activation), at width factor 0.5 (32-channel root, the least that
# GroupNorm(32) allows). 'hybrid': root + one bottleneck stage (projection shortcut), patch 1 on the stride-4 map
# (the R26/R50 layout); 'hybrid_ti': root only with 2x2 patches (the R+Ti/16 layout).
# PVTv2 at 64 px: stage maps 16, 8, 4, 2 with sr 8, 4, 2, 1 (sra) or the 7x7 adaptive pool (uneven bins, linear).
# MViTv2 at 64 px (img_size 64 sizes the relative-position tables): pooled q/kv, a width change per stage.
CONFIGS = {
    'vit': ('timm.models.vision_transformer', 'VisionTransformer',
            dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0),
            'vit_ti16', dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=128,
                             classifier='token', gelu_approximate=False), 32),
    'deit': ('timm.models.deit', 'VisionTransformerDistilled',
             dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0),
             'deit_ti16_distilled', dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=128), 32),
    'mixer': ('timm.models.mlp_mixer', 'MlpMixer', dict(patch_size=4, embed_dim=32, num_blocks=2, mlp_ratio=(0.5, 4.0)),
              'mixer_s16', dict(patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=128,
                                gelu_approximate=False), 32),
    'swin': ('timm.models.swin_transformer', 'SwinTransformer', _SWIN_TIMM, 'swin_t', _SWIN_OURS, 32),
    'swinv2': ('timm.models.swin_transformer_v2', 'SwinTransformerV2', _SWIN_TIMM, 'swinv2_t', _SWIN_OURS, 32),
    'hybrid': ('timm.models.vision_transformer', 'VisionTransformer',
               dict(patch_size=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=4.0,
                    backbone=dict(layers=(1,), width_factor=0.5)),
               'r26_vit_s32', dict(patch_size=1, resnet=(1,), **_HYBRID_OURS), 32),
    'hybrid_ti': ('timm.models.vision_transformer', 'VisionTransformer',
                  dict(patch_size=2, embed_dim=16, depth=2, num_heads=2, mlp_ratio=4.0,
                       backbone=dict(layers=(), width_factor=0.5)),
                  'r_vit_ti16', dict(patch_size=2, resnet=(), **_HYBRID_OURS), 32),
    'pvt_v2': ('timm.models.pvt_v2', 'PyramidVisionTransformerV2', _PVT,
               'pvt_v2_b0', dict(drop_path_rate=0.0, **_PVT), 64),
    'pvt_v2_li': ('timm.models.pvt_v2', 'PyramidVisionTransformerV2', dict(linear=True, **_PVT),
                  'pvt_v2_b2_li', dict(drop_path_rate=0.0, **_PVT), 64),
    'mvitv2': ('timm.models.mvitv2', 'MultiScaleVit', dict(cfg=_MVIT),
               'mvitv2_t', dict(drop_path_rate=0.0, img_size=64, **_MVIT), 64),
    # ConvNeXt at 32 px: stage maps 8, 4, 2, 1 (every downsampling step; 7x7 depthwise convs padded past the map).
    'convnext': ('timm.models.convnext', 'ConvNeXt', _CONVNEXT,
                 'convnext_t', dict(drop_path_rate=0.0, **_CONVNEXT), 32),
    # CaiT: talking-heads self-attention blocks, then two class-attention blocks; layer scale perturbed.
    'cait': ('timm.models.cait', 'Cait', dict(patch_size=4, init_values=1e-5, **_CAIT),
             'cait_xxs24', dict(patch_size=4, **_CAIT), 32),
    # BEiT: per-block relative position bias on the 8x8 grid (+3 class rows), q/v biases, layer scale, fc_norm.
    'beit': ('timm.models.beit', 'Beit', dict(patch_size=4, use_abs_pos_emb=False, use_rel_pos_bias=True,
                                              init_values=0.1, **_BEIT),
             'beit_b16', dict(patch_size=4, **_BEIT), 32),
}


def _hybrid_backbone(layers, width_factor):
  """timm's `_resnetv2` (vision_transformer_hybrid.py) with a width factor."""
  import functools  # pylint: disable=g-import-not-at-top
  from timm.layers import StdConv2dSame  # pylint: disable=g-import-not-at-top
  from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem  # pylint: disable=g-import-not-at-top
  conv = functools.partial(StdConv2dSame, eps=1e-8)
  if layers:
    return ResNetV2(layers=layers, num_classes=0, global_pool='', preact=False, stem_type='same', conv_layer=conv,
                    width_factor=width_factor)
  return create_resnetv2_stem(3, out_chs=int(64 * width_factor), stem_type='same', preact=False, conv_layer=conv)


def _timm_model(module, cls_name, kwargs):
  """The timm model for `kwargs` (a 'backbone' entry builds a hybrid; a 'cfg' entry a MultiScaleVitCfg)."""
  import functools  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  tcls = getattr(importlib.import_module(module), cls_name)
  kwargs = dict(kwargs)
  if 'backbone' in kwargs:
    from timm.models.vision_transformer_hybrid import HybridEmbed  # pylint: disable=g-import-not-at-top
    kwargs['embed_layer'] = functools.partial(HybridEmbed, backbone=_hybrid_backbone(**kwargs.pop('backbone')))
  if 'cfg' in kwargs:
    from timm.models.mvitv2 import MultiScaleVitCfg  # pylint: disable=g-import-not-at-top
    kwargs['cfg'] = MultiScaleVitCfg(**kwargs['cfg'])
  return tcls(**kwargs)


def _randomize(model, seed: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('logit_scale'):
        p.copy_(torch.rand(p.shape, generator=g) * 3.0 + 2.0)  # 2..5: some above the log(100) clamp.
      elif p.ndim == 1 and name.split('.')[-2].startswith('norm'):  # LayerNorm weights/biases.
        base = 1.0 if name.endswith('weight') else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 0.1))


def randomize_running_stats(model, g) -> None:
  """Random BatchNorm running statistics (mean ~ N(0, 0.2^2), var in [0.5, 1.5)) drawn from generator `g`, so
  that converted `batch_stats` matter in eval-mode parity."""
  import torch  # pylint: disable=g-import-not-at-top
  for name, b in model.named_buffers():
    if name.endswith('running_mean'):
      b.copy_(0.2 * torch.randn(b.shape, generator=g))
    elif name.endswith('running_var'):
      b.copy_(0.5 + torch.rand(b.shape, generator=g))


def make(family: str, seed: int = 0) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  module, cls_name, tkw, model, overrides, size = CONFIGS[family]
  torch.manual_seed(seed)
  kwargs = dict(num_classes=NUM_CLASSES, drop_path_rate=0.0, **tkw)
  if not family.startswith(('pvt', 'convnext')):  # timm's PVTv2 and ConvNeXt take any size, have no img_size.
    kwargs['img_size'] = size
  tmodel = _timm_model(module, cls_name, kwargs).eval()
  _randomize(tmodel, seed)
  x = np.random.default_rng(seed).standard_normal((BATCH if size <= 32 else 1, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    logits = tmodel(torch.from_numpy(x)).numpy()
  sd = {k: v.detach().contiguous().clone() for k, v in tmodel.state_dict().items()}
  os.makedirs(OUT_DIR, exist_ok=True)
  base = os.path.join(OUT_DIR, family)
  save_file(sd, base + '.safetensors')
  np.savez(base + '.npz', input_nhwc=x.transpose(0, 2, 3, 1), logits=logits)
  meta = dict(timm_class=f'{module}.{cls_name}', timm_kwargs=kwargs, timm_version=__import__('timm').__version__,
              torch_version=torch.__version__, seed=seed, model=model, model_overrides=overrides, image_size=size,
              num_classes=NUM_CLASSES)
  with open(base + '.json', 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write('\n')
  for ext in ('.safetensors', '.npz', '.json'):
    os.chmod(base + ext, 0o644)
  sizes = {ext: os.path.getsize(base + ext) for ext in ('.safetensors', '.npz', '.json')}
  print(f'{family}: {len(sd)} tensors, logits |max| {np.abs(logits).max():.3f}, bytes {sizes}')


def make_resize_fixture(seed: int = 0) -> None:
  """resize.npz: Swin v1 bias tables resized as the official Swin loader does (torch bicubic per head, up and
  down), and a ViT position grid resized as timm's resample_abs_pos_embed (torch bicubic, upsampling)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name
  rng = np.random.default_rng(seed)
  out = {}
  for name, (s1, s2, heads) in {'table_3_to_5': (5, 9, 2), 'table_5_to_3': (9, 5, 2)}.items():
    table = rng.standard_normal((s1 * s1, heads)).astype(np.float32)
    t = torch.from_numpy(table).permute(1, 0).reshape(1, heads, s1, s1)  # Official Swin utils.load_pretrained.
    resized = F.interpolate(t, size=(s2, s2), mode='bicubic').reshape(heads, s2 * s2).permute(1, 0)
    out[name + '_in'], out[name + '_out'] = table, resized.numpy()
  grid = rng.standard_normal((1, 4, 4, 8)).astype(np.float32)  # (1, H, W, D), as timm's posemb grid (NHWC).
  resized = F.interpolate(torch.from_numpy(grid).permute(0, 3, 1, 2), size=(6, 6), mode='bicubic', antialias=True,
                          align_corners=False)
  out['posemb_4_to_6_in'], out['posemb_4_to_6_out'] = grid, resized.permute(0, 2, 3, 1).numpy()
  path = os.path.join(OUT_DIR, 'resize.npz')
  np.savez(path, **out)
  os.chmod(path, 0o644)
  print(f'resize: {sorted(out)}, bytes {os.path.getsize(path)}')


def main() -> None:
  _import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  for family in sys.argv[1:] or list(CONFIGS) + ['resize']:
    if family == 'resize':
      make_resize_fixture()
    else:
      make(family)


if __name__ == '__main__':
  main()
