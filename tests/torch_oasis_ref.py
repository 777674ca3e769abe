"""PyTorch reference OASIS generator (tests and bench only; torch is a test dependency).

Written from the structure of boschresearch/OASIS models/generator.py + models/norms.py so
its state_dict has the official key names (fc.*, body.{i}.conv_{0,1,s}.weight_orig/_u/_v,
body.{i}.norm_*.first_norm.running_*, .mlp_shared.0.*, .mlp_gamma.*, .mlp_beta.*,
conv_img.*). Single process: SynchronizedBatchNorm2d == BatchNorm2d(affine=False).
Unlike OASIS, forward accepts a fixed z (OASIS always samples it) for parity tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


class SPADE(nn.Module):
  def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
    super().__init__()
    self.first_norm = nn.BatchNorm2d(norm_nc, affine=False)
    self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
    self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
    self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

  def forward(self, x, segmap):
    normalized = self.first_norm(x)
    segmap = F.interpolate(segmap, size=x.size()[2:], mode='nearest')
    actv = self.mlp_shared(segmap)
    return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class ResnetBlockWithSPADE(nn.Module):
  def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128):
    super().__init__()
    self.learned_shortcut = fin != fout
    fmiddle = min(fin, fout)
    self.conv_0 = spectral_norm(nn.Conv2d(fin, fmiddle, 3, padding=1))
    self.conv_1 = spectral_norm(nn.Conv2d(fmiddle, fout, 3, padding=1))
    if self.learned_shortcut:
      self.conv_s = spectral_norm(nn.Conv2d(fin, fout, 1, bias=False))
    self.norm_0 = SPADE(fin, label_nc, hidden)
    self.norm_1 = SPADE(fmiddle, label_nc, hidden)
    if self.learned_shortcut:
      self.norm_s = SPADE(fin, label_nc, hidden)
    self.activ = nn.LeakyReLU(0.2)

  def forward(self, x, seg):
    x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
    dx = self.conv_0(self.activ(self.norm_0(x, seg)))
    dx = self.conv_1(self.activ(self.norm_1(dx, seg)))
    return x_s + dx


class OASISGenerator(nn.Module):
  def __init__(self, num_classes: int, height: int, width: int, ch: int = 64, z_dim: int = 64,
               hidden: int = 128):
    super().__init__()
    self.z_dim, self.init_hw = z_dim, (height // 32, width // 32)
    widths = [16 * ch, 16 * ch, 16 * ch, 8 * ch, 4 * ch, 2 * ch, 1 * ch]
    label_nc = num_classes + z_dim
    self.conv_img = nn.Conv2d(widths[-1], 3, 3, padding=1)
    self.up = nn.Upsample(scale_factor=2)
    self.body = nn.ModuleList(
        [ResnetBlockWithSPADE(widths[i], widths[i + 1], label_nc, hidden) for i in range(6)])
    self.fc = nn.Conv2d(label_nc, widths[0], 3, padding=1)

  def init_weights(self, gain: float = 0.02) -> None:
    """OASIS init_networks: xavier_normal(gain) on conv weights, zero biases."""
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        w = m.weight_orig if hasattr(m, 'weight_orig') else m.weight
        nn.init.xavier_normal_(w.data, gain=gain)
        if m.bias is not None:
          nn.init.constant_(m.bias.data, 0.0)

  def forward(self, seg, z=None):
    if self.z_dim:
      if z is None:
        z = torch.randn(seg.size(0), self.z_dim, dtype=torch.float32, device=seg.device)
      z = z.view(z.size(0), self.z_dim, 1, 1).expand(z.size(0), self.z_dim, seg.size(2),
                                                      seg.size(3))
      seg = torch.cat((z, seg), dim=1)
    x = F.interpolate(seg, size=self.init_hw)
    x = self.fc(x)
    for i in range(6):
      x = self.body[i](x, seg)
      if i < 5:
        x = self.up(x)
    return torch.tanh(self.conv_img(F.leaky_relu(x, 2e-1)))
