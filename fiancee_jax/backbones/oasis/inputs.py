"""OASIS inference inputs (Sec. 4.1): a label map (a label-id PNG or an example of a data
split) and a noise seed -> route inputs (labels (B, H, W) int32, z (B, z_dim) float32); the
adapter's `infer_inputs()`."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fiancee_jax.infer import inputs as infer_inputs
from fiancee_jax.infer.inputs import InferError, Request

HEAD_FLAGS = ('source', 'driver', 'source_index', 'driver_index', 'identity')


class OASISInputs(infer_inputs.BackboneInputs):
  report_kind = 'oasis'

  def from_flags(self, workdir: str, flags: dict[str, Any]) -> Request:
    """--label PNG or --index of --split, and --noise_seed (the same seed, the same image)."""
    c = self.config
    if infer_inputs.given(flags, HEAD_FLAGS):
      raise InferError(f'{c.name} is an OASIS config: give --label or --index, not the '
                       'head-avatar flags (--source, --driver, --identity, ...)')
    label, index, split = flags.get('label'), flags.get('index'), flags.get('split', 'test')
    if (label is None) == (index is None):
      raise InferError('give exactly one of --label (a label-id PNG) or --index (a data split '
                       'index)')
    if label is not None:
      labels, name = infer_inputs.read_label(label, c), infer_inputs.stem(label)
    else:
      labels = infer_inputs.dataset_label(c, workdir, split, int(index))
      name = f'{split}{int(index)}'
    seed = int(flags.get('noise_seed') or 0)
    z = infer_inputs.noise(c, seed)
    return Request(inputs=(labels[None].astype(np.int32), z[None]), name=f'{name}_s{seed}',
                   info={'noise_seed': seed, 'input': label or f'{split}[{index}]'})

  def from_rows(self, workdir: str, rows: dict[str, Any]
                ) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    """(label maps (N, H, W) of the rows' maps, their noises z (N, z_dim)), no extras."""
    labels = infer_inputs.dataset_labels(self.config, workdir, rows['data_split'], rows['maps'])
    return (labels, np.asarray(rows['z'], np.float32)), {}

  def sample_columns(self, inputs: Sequence[np.ndarray], k: int, guide: Any
                     ) -> dict[str, Any]:
    return {'labels': np.asarray(inputs[0][:k])}
