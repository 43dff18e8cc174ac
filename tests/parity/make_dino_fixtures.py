"""Writes tests/parity/fixtures/dino.npz (+ dino.safetensors) from PyTorch: DINO's loss, head, position-table
interpolation, and a tiny whole DINO model (ViT + head, the official state-dict layout) on a global and a local crop.

    python tests/parity/make_dino_fixtures.py

The torch modules below restate facebookresearch/dino (main_dino.py `DINOLoss`, vision_transformer.py `DINOHead`
and `interpolate_pos_encoding`) with torch's own ops, so the fixture records what torch computes: the chunking of
the (n_crops * B, K) outputs, the skipped view pairs, the centre update, weight_norm's dim and
F.interpolate(bicubic, scale_factor=...). The tests read only the .npz (no torch needed).
"""
import math
import os

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), 'fixtures', 'dino.npz')
WEIGHTS = os.path.join(os.path.dirname(__file__), 'fixtures', 'dino.safetensors')
# The tiny model of the whole-model fixture (our create_model overrides of dino_vit_s16 say the same).
TINY = dict(patch=4, dim=16, depth=2, heads=2, mlp=32, image=16, local=8, hidden=24, bottleneck=8, out_dim=32)


class DINOLoss(nn.Module):
  """main_dino.py's DINOLoss on one process (the all-reduce of the centre is the identity)."""

  def __init__(self, out_dim, ncrops, teacher_temp, student_temp=0.1, center_momentum=0.9):
    super().__init__()
    self.student_temp, self.center_momentum, self.ncrops, self.teacher_temp = (student_temp, center_momentum,
                                                                               ncrops, teacher_temp)
    self.register_buffer('center', torch.zeros(1, out_dim))

  def forward(self, student_output, teacher_output):
    student_out = (student_output / self.student_temp).chunk(self.ncrops)
    teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
    total, terms = 0, 0
    for iq, q in enumerate(teacher_out):
      for v in range(len(student_out)):
        if v == iq:
          continue
        total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
        terms += 1
    total /= terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
    return total


class DINOHead(nn.Module):
  """vision_transformer.py's DINOHead (use_bn=False)."""

  def __init__(self, in_dim, out_dim, norm_last_layer=True, hidden_dim=2048, bottleneck_dim=256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                             nn.Linear(hidden_dim, bottleneck_dim))
    self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    x = F.normalize(self.mlp(x), dim=-1, p=2)
    return self.last_layer(x)


def interpolate_pos_encoding(pos_embed, npatch_w, npatch_h):
  """vision_transformer.py's interpolate_pos_encoding for a (1, 1 + N, D) table and a w0 x h0 patch grid."""
  n = pos_embed.shape[1] - 1
  dim = pos_embed.shape[-1]
  w0, h0 = npatch_w + 0.1, npatch_h + 0.1
  side = int(math.sqrt(n))
  patch = F.interpolate(pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode='bicubic')
  patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
  return torch.cat((pos_embed[:, :1], patch), dim=1)


class Attention(nn.Module):
  """vision_transformer.py's Attention (qkv_bias=True)."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads, self.scale = heads, (dim // heads) ** -0.5
    self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads, mlp):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
    self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, mlp)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class VisionTransformer(nn.Module):
  """vision_transformer.py's VisionTransformer (num_classes=0): class token after the final norm, any crop size."""

  def __init__(self, patch, dim, depth, heads, mlp, image):
    super().__init__()
    self.patch = patch
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)
    self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x):
    _, _, w, h = x.shape
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if x.shape[1] == self.pos_embed.shape[1] and w == h:
      x = x + self.pos_embed
    else:
      x = x + interpolate_pos_encoding(self.pos_embed, w // self.patch, h // self.patch)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)[:, 0]


class MultiCropWrapper(nn.Module):
  """utils.MultiCropWrapper for one crop size at a time: head(backbone(x)); state-dict keys backbone.* / head.*."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, x):
    return self.head(self.backbone(x))


def whole_model(out):
  """A tiny DINO ViT + head in the official layout, its weights (safetensors) and outputs on 16 and 8 px crops."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  t = TINY
  model = MultiCropWrapper(VisionTransformer(t['patch'], t['dim'], t['depth'], t['heads'], t['mlp'], t['image']),
                           DINOHead(t['dim'], t['out_dim'], hidden_dim=t['hidden'], bottleneck_dim=t['bottleneck']))
  with torch.no_grad():
    for p in model.parameters():  # Non-degenerate weights everywhere (zero biases would hide a transposition).
      if p.requires_grad:
        p.add_(torch.randn_like(p) * 0.1)
  model.eval()
  glob, local = torch.randn(2, 3, t['image'], t['image']), torch.randn(2, 3, t['local'], t['local'])
  with torch.no_grad():
    out['model_global_in'], out['model_local_in'] = glob.permute(0, 2, 3, 1).numpy(), local.permute(0, 2, 3, 1).numpy()
    out['model_global_out'], out['model_local_out'] = model(glob).numpy(), model(local).numpy()
  save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, WEIGHTS)


def main():
  torch.manual_seed(0)
  out = {}
  # Loss: 2 global + 3 local crops, batch 4, K = 16, a non-zero centre.
  ncrops, batch, k = 5, 4, 16
  student = torch.randn(ncrops * batch, k) * 3
  teacher = torch.randn(2 * batch, k) * 3
  loss_fn = DINOLoss(k, ncrops, teacher_temp=0.05, student_temp=0.1, center_momentum=0.9)
  loss_fn.center = torch.randn(1, k)
  out['loss_center_in'] = loss_fn.center.numpy().copy()
  out['loss_student'], out['loss_teacher'] = student.numpy(), teacher.numpy()
  out['loss_value'] = np.float32(loss_fn(student, teacher).item())
  out['loss_center_out'] = loss_fn.center.numpy()

  # Head: D = 8, hidden 12, bottleneck 6, K = 10; weight_g left at 1 (frozen) as in DINO.
  head = DINOHead(8, 10, hidden_dim=12, bottleneck_dim=6)
  x = torch.randn(3, 8)
  for i in (0, 2, 4):
    out[f'head_mlp{i}_weight'] = head.mlp[i].weight.detach().numpy()
    out[f'head_mlp{i}_bias'] = head.mlp[i].bias.detach().numpy()
  out['head_weight_v'] = head.last_layer.weight_v.detach().numpy() * 3.0  # Only v's direction matters.
  with torch.no_grad():
    head.last_layer.weight_v.mul_(3.0)
    out['head_x'], out['head_y'] = x.numpy(), head(x).numpy()

  # Position tables: 14 x 14 (+ cls) -> 6 x 6 (96 px local crop at patch 16) and 14 x 14 -> 4 x 7.
  pos = torch.randn(1, 1 + 14 * 14, 5)
  out['pos_table'] = pos.numpy()
  out['pos_6x6'] = interpolate_pos_encoding(pos, 6, 6).numpy()
  ramp = (torch.arange(14.0) ** 2).reshape(1, 1, 1, 14)
  out['ramp_14_to_6'] = F.interpolate(ramp.expand(1, 1, 2, 14), scale_factor=(1.0, 6.1 / 14),
                                      mode='bicubic')[0, 0, 0].numpy()
  grid = torch.randn(1, 3, 14, 14)
  out['grid_in'] = grid.numpy()
  out['grid_4x7'] = F.interpolate(grid, scale_factor=(4.1 / 14, 7.1 / 14), mode='bicubic').numpy()
  whole_model(out)
  np.savez(OUT, **{key: np.asarray(v, np.float32) for key, v in out.items()})
  print('wrote', OUT, sorted(out))


if __name__ == '__main__':
  main()
