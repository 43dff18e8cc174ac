"""Regenerates the MAE parity fixtures used by tests/test_mae.py. Needs torch (and timm for the fine-tuning head);
NOT needed by the tests themselves:

    python tests/parity/make_mae_fixtures.py

`TorchMAE` below is a PyTorch masked autoencoder written from the facts of the official
facebookresearch/mae models_mae.py (MaskedAutoencoderViT with timm's pre-norm Block: fused qkv with bias, exact
GELU, LayerNorm eps 1e-6; random_masking by argsort of uniform noise; 'nchpwq->nhwpqc' patchify; norm_pix_loss
with the unbiased variance). It is built at a tiny size with randomised weights (biases, norms, tokens perturbed so
nothing is trivially zero or one), run on a fixed input with fixed noise, and written under tests/parity/fixtures/:

  mae.safetensors  the state dict, in the official key layout (pos_embed / decoder_pos_embed included, float32)
  mae.npz          'input_nhwc', 'noise', 'loss', 'loss_norm_pix', 'pred', 'mask', 'pos_embed', 'decoder_pos_embed'
  mae.json         the sizes, and the vit_jax model name + create_model overrides

and the MAE fine-tuning head (timm VisionTransformer(global_pool='avg', fc_norm=True), i.e. our
classifier='gap_fc_norm'): mae_finetune.{safetensors,npz,json} like make_fixtures.py's ('input_nhwc', 'logits').
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top  (the timm import helper, OUT_DIR)

IMG, PATCH, CHANS = 16, 4, 3
SIZES = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=4.0, decoder_embed_dim=12, decoder_depth=2,
             decoder_num_heads=3)
OURS = dict(patch_size=PATCH, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=64, decoder_hidden_size=12,
            decoder_num_layers=2, decoder_num_heads=3, decoder_mlp_dim=48)
BATCH, MASK_RATIO = 2, 0.75


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE util/pos_embed.py get_1d_sincos_pos_embed_from_grid: [sin(pos w), cos(pos w)], w = 1/10000^(i/(dim/2))."""
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum('m,d->md', pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool) -> np.ndarray:
  """get_2d_sincos_pos_embed: grid = meshgrid(grid_w, grid_h) (w first), first half from grid[0]."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
  emb = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return emb


class Attention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  """timm's pre-norm ViT block as models_mae.py uses it (qkv_bias=True, LayerNorm eps 1e-6)."""

  def __init__(self, dim, num_heads, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, chans, dim):
    super().__init__()
    self.proj = nn.Conv2d(chans, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchMAE(nn.Module):
  """models_mae.MaskedAutoencoderViT's structure and forward, with the masking noise passed in."""

  def __init__(self, embed_dim, depth, num_heads, mlp_ratio, decoder_embed_dim, decoder_depth, decoder_num_heads,
               norm_pix_loss=False):
    super().__init__()
    self.patch = PATCH
    num_patches = (IMG // PATCH) ** 2
    self.patch_embed = PatchEmbed(PATCH, CHANS, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
    self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                         for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(decoder_embed_dim, PATCH ** 2 * CHANS, bias=True)
    self.norm_pix_loss = norm_pix_loss
    grid = IMG // PATCH
    self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(embed_dim, grid, True)).float().unsqueeze(0))
    self.decoder_pos_embed.data.copy_(
        torch.from_numpy(sincos_2d(decoder_embed_dim, grid, True)).float().unsqueeze(0))

  def patchify(self, imgs):
    p = self.patch
    h = w = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(imgs.shape[0], h * w, p ** 2 * 3)

  def random_masking(self, x, mask_ratio, noise):
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore

  def forward_encoder(self, x, mask_ratio, noise):
    x = self.patch_embed(x)
    x = x + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
    cls_token = self.cls_token + self.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

  def forward_loss(self, imgs, pred, mask):
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward(self, imgs, noise, mask_ratio=MASK_RATIO):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(imgs, pred, mask), pred, mask


def _perturb(model: nn.Module, generator: torch.Generator) -> None:
  """Random weights everywhere except the frozen position tables (which must stay MAE's sin-cos)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'pos_embed' in name and not p.requires_grad:
        continue
      base = 1.0 if name.endswith('weight') and p.ndim == 1 else 0.0
      p.copy_(base + 0.2 * torch.randn(p.shape, generator=generator))


def _save(name: str, state_dict, arrays: dict, meta: dict) -> None:
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(make_fixtures.OUT_DIR, exist_ok=True)
  base = os.path.join(make_fixtures.OUT_DIR, name)
  save_file({k: v.detach().contiguous().float() for k, v in state_dict.items()}, base + '.safetensors')
  np.savez(base + '.npz', **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
  with open(base + '.json', 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  print('wrote', base)


def make_mae() -> None:
  generator = torch.Generator().manual_seed(0)
  model = TorchMAE(**SIZES).eval()
  _perturb(model, generator)
  images = torch.randn(BATCH, CHANS, IMG, IMG, generator=generator)
  noise = torch.rand(BATCH, (IMG // PATCH) ** 2, generator=generator)
  with torch.no_grad():
    loss, pred, mask = model(images, noise)
    model.norm_pix_loss = True
    loss_norm_pix, _, _ = model(images, noise)
  _save('mae', model.state_dict(),
        dict(input_nhwc=images.permute(0, 2, 3, 1).numpy(), noise=noise.numpy(), loss=loss.numpy(),
             loss_norm_pix=loss_norm_pix.numpy(), pred=pred.numpy(), mask=mask.numpy(),
             pos_embed=model.pos_embed.numpy(), decoder_pos_embed=model.decoder_pos_embed.numpy()),
        dict(torch_class='models_mae.MaskedAutoencoderViT (tests/parity/make_mae_fixtures.py TorchMAE)',
             torch_kwargs=dict(img_size=IMG, patch_size=PATCH, **SIZES), mask_ratio=MASK_RATIO,
             model='mae_vit_b16', overrides=OURS, image_size=IMG))


def make_finetune_head() -> None:
  """timm's ViT with MAE's fine-tuning head (global_pool='avg', fc_norm=True)."""
  make_fixtures._import_timm()  # pylint: disable=protected-access
  import timm  # pylint: disable=g-import-not-at-top
  kwargs = dict(img_size=IMG, patch_size=PATCH, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                global_pool='avg', fc_norm=True)
  model = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
  generator = torch.Generator().manual_seed(1)
  _perturb(model, generator)
  images = torch.randn(BATCH, CHANS, IMG, IMG, generator=generator)
  with torch.no_grad():
    logits = model(images)
  _save('mae_finetune', model.state_dict(), dict(input_nhwc=images.permute(0, 2, 3, 1).numpy(), logits=logits.numpy()),
        dict(timm_class='timm.models.vision_transformer.VisionTransformer', timm_kwargs=kwargs, model='vit_b16',
             overrides=dict(patch_size=PATCH, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=64,
                            classifier='gap_fc_norm', gelu_approximate=False), image_size=IMG))


if __name__ == '__main__':
  torch.manual_seed(0)
  make_mae()
  make_finetune_head()
