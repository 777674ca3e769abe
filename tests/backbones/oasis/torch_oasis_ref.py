"""PyTorch reference OASIS generator, discriminator, losses and training iteration (tests and
bench only; torch is a test dependency).

Written from the structure of boschresearch/OASIS models/{generator,discriminator,losses}.py
+ models/norms.py so the state_dicts have the official key names (G: fc.*,
body.{i}.conv_{0,1,s}.weight_orig/_u/_v, body.{i}.norm_*.first_norm.running_*,
.mlp_shared.0.*, .mlp_gamma.*, .mlp_beta.*, conv_img.*; D: see OASISDiscriminator). Single process: SynchronizedBatchNorm2d == BatchNorm2d(affine=False).
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


# ------------------------------------------------------------------------------------------
# Discriminator (OASIS models/discriminator.py): state_dict keys body_down.{i}.conv1.{0|1}.*,
# body_{down,up}.{i}.conv2.1.*, .conv_s.*, body_up.{i}.conv1.2.*, layer_up_last.*.


class ResidualBlockD(nn.Module):
  """residual_block_D: conv1 = [lrelu, (up x2), SN conv3x3] ([SN conv] when first),
  conv2 = [lrelu, SN conv3x3]; shortcut: (pool | up), SN conv1x1 if fin != fout, (pool)."""

  def __init__(self, fin: int, fout: int, up_or_down: int, first: bool = False):
    super().__init__()
    self.up_or_down, self.first, self.learned_shortcut = up_or_down, first, fin != fout
    conv = spectral_norm(nn.Conv2d(fin, fout, 3, padding=1))
    if first:
      self.conv1 = nn.Sequential(conv)
    elif up_or_down > 0:
      self.conv1 = nn.Sequential(nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2), conv)
    else:
      self.conv1 = nn.Sequential(nn.LeakyReLU(0.2), conv)
    self.conv2 = nn.Sequential(nn.LeakyReLU(0.2), spectral_norm(nn.Conv2d(fout, fout, 3, padding=1)))
    if self.learned_shortcut:
      self.conv_s = spectral_norm(nn.Conv2d(fin, fout, 1))
    self.sampling = nn.Upsample(scale_factor=2) if up_or_down > 0 else nn.AvgPool2d(2)

  def shortcut(self, x):
    if self.first and self.up_or_down < 0:
      x = self.sampling(x)
    if not self.first and self.up_or_down > 0:
      x = self.sampling(x)
    if self.learned_shortcut:
      x = self.conv_s(x)
    if not self.first and self.up_or_down < 0:
      x = self.sampling(x)
    return x

  def forward(self, x):
    dx = self.conv2(self.conv1(x))
    if self.up_or_down < 0:
      dx = self.sampling(dx)
    return self.shortcut(x) + dx


class OASISDiscriminator(nn.Module):
  """U-Net: 6 down blocks, 6 up blocks with the encoder outputs concatenated before each
  but the first, 1x1 conv (no SN) to num_classes + 1 logits."""

  def __init__(self, num_classes: int, channels=(3, 128, 128, 256, 256, 512, 512)):
    super().__init__()
    c, n = list(channels), len(channels) - 1
    self.body_down = nn.ModuleList(
        [ResidualBlockD(c[i], c[i + 1], -1, first=i == 0) for i in range(n)])
    ups = [ResidualBlockD(c[-1], c[-2], 1)]
    ups += [ResidualBlockD(2 * c[-1 - i], c[-2 - i], 1) for i in range(1, n - 1)]
    ups += [ResidualBlockD(2 * c[1], 64, 1)]
    self.body_up = nn.ModuleList(ups)
    self.layer_up_last = nn.Conv2d(64, num_classes + 1, 1)

  init_weights = OASISGenerator.init_weights

  def forward(self, x):
    skips = []
    for block in self.body_down:
      x = block(x)
      skips.append(x)
    x = self.body_up[0](x)
    for i in range(1, len(self.body_up)):
      x = self.body_up[i](torch.cat((skips[-i - 1], x), dim=1))
    return self.layer_up_last(x)


# ------------------------------------------------------------------------------------------
# Losses and one training iteration (OASIS models/losses.py, models/models.py, train.py).
# `label` is the one-hot map (B, C, H, W) as OASIS's preprocess_input makes it.


def class_balancing(label, contain_dontcare_label: bool = True):
  """get_class_balancing: numel / (count_c * classes present) per pixel, (B, 1, H, W)."""
  occurrence = label.sum(dim=(0, 2, 3))
  if contain_dontcare_label:
    occurrence[0] = 0
  present = (occurrence > 0).sum()
  coef = torch.reciprocal(occurrence) * label.numel() / (present * label.shape[1])
  if contain_dontcare_label:
    coef[0] = 0
  return coef[label.argmax(dim=1, keepdim=True)]


def n1_target(label, for_real: bool):
  """get_n1_target: label + 1 for real, 0 ('fake') for fake."""
  c = label.shape[1]
  ids = label.argmax(dim=1) + (c if for_real else 0)
  return torch.clamp(ids, min=c - 1) - c + 1


def n1_loss(logits, label, for_real: bool):
  """losses_computer.loss: per-pixel CE, class-balanced mean for real, plain mean for fake."""
  loss = F.cross_entropy(logits, n1_target(label, for_real), reduction='none')
  if for_real:
    return torch.mean(loss * class_balancing(label)[:, 0])
  return torch.mean(loss)


def loss_labelmix(mask, d_mixed, d_fake, d_real):
  """losses_computer.loss_labelmix: MSE(mask * D(real) + (1 - mask) * D(fake), D(mixed))."""
  return F.mse_loss(mask * d_real + (1 - mask) * d_fake, d_mixed)


def generate_labelmix(label, fake, real, bits=None):
  """generate_labelmix with the per-class bits given (bits[c] in {0, 1}) instead of drawn,
  so a test can use the mask of the JAX step. Returns (mixed image, mask (B, 1, H, W))."""
  ids = label.argmax(dim=1, keepdim=True)
  if bits is None:
    bits = torch.randint(0, 2, (label.shape[1],))
  mask = bits.to(real.dtype)[ids]
  return mask * real + (1 - mask) * fake, mask


def train_iteration(G, D, opt_g, opt_d, image, label, z_d, z_g, mask, labelmix_lambda):
  """One OASIS iteration in our order (D update, then G update against the updated D),
  with the noise and LabelMix mask given. Returns the loss values as floats."""
  D.zero_grad()
  with torch.no_grad():
    fake = G(label, z_d)
  d_fake = D(fake)
  l_fake = n1_loss(d_fake, label, for_real=False)
  d_real = D(image)
  l_real = n1_loss(d_real, label, for_real=True)
  mixed = mask * image + (1 - mask) * fake
  l_lm = loss_labelmix(mask, D(mixed), d_fake, d_real)
  d_total = l_fake + l_real + labelmix_lambda * l_lm
  d_total.backward()
  opt_d.step()
  G.zero_grad()
  D.zero_grad()
  g_adv = n1_loss(D(G(label, z_g)), label, for_real=True)
  g_adv.backward()
  opt_g.step()
  return {'d_fake': l_fake.item(), 'd_real': l_real.item(), 'd_labelmix': l_lm.item(),
          'd_total': d_total.item(), 'g_adv': g_adv.item()}
