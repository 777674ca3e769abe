"""The routing rule of every command that routes (`infer.py` one input, `infer.py --sweep`):
which offset `routing.choose_exit` adds to the predictions, for each asked threshold.

  --rule=calibrated (default)  conformal offset for --alpha (default config.routing.alpha)
  --rule=ltt                   Learn-then-Test offset for --alpha and --delta
  --rule=paper                 offset 0 (the paper's rule)
  --offset=X                   this offset, by hand, for every threshold (rule 'manual');
                               an override: it cannot be combined with --rule

`core.calibration` says what each rule guarantees. The calibrated rules use the calibration
rows `train.py --stage=predictor` cached (`core.predictor_data.cached`): the trained
predictor's predictions on them vs their true LPIPS.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from fiancee_jax.core import calibration, predictor_data
from fiancee_jax.core.interface import Backbone
from fiancee_jax.infer.inputs import InferError

RULES = calibration.RULES
MANUAL = 'manual'
DEFAULT_DELTA = 0.1


@dataclasses.dataclass
class Rule:
  """One routing rule, with the calibration rows it needs (None for 'paper' / 'manual')."""
  name: str                       # one of RULES, or MANUAL
  alpha: float | None = None      # calibrated / ltt
  delta: float | None = None      # ltt
  manual_offset: float | None = None
  pred_cal: np.ndarray | None = None
  true_cal: np.ndarray | None = None
  load_s: float = 0.0             # seconds spent reading the rows and predicting on them

  def offset(self, threshold: float, costs: Any) -> float:
    """The offset for `threshold` (+inf: every input to the backbone)."""
    if self.name == MANUAL:
      return float(self.manual_offset)
    return calibration.offset(self.name, self.pred_cal, self.true_cal, threshold, costs,
                              self.alpha, self.delta)

  @property
  def num_rows(self) -> int:
    return 0 if self.true_cal is None else int(len(self.true_cal))

  def describe(self) -> str:
    if self.name == MANUAL:
      return f'offset {self.manual_offset:g} given by hand (--offset; no guarantee)'
    return calibration.describe(self.name, self.alpha, self.delta, self.num_rows)

  def info(self, threshold: float, costs: Any) -> dict[str, Any]:
    """What a JSON line says about the rule at `threshold`."""
    out: dict[str, Any] = {'rule': self.name, 'offset': self.offset(threshold, costs)}
    if self.name in ('calibrated', 'ltt'):
      out.update(alpha=self.alpha, calibration_rows=self.num_rows)
    if self.name == 'ltt':
      out['delta'] = self.delta
    if out['offset'] == math.inf:
      out['offset_note'] = (f'{self.num_rows} calibration rows are too few for this rule at '
                            'alpha (and delta): every input goes to the backbone')
    return out


def check(rule: str | None = None, alpha: float | None = None, delta: float | None = None,
          offset: float | None = None, default_alpha: float = 0.1) -> Rule:
  """The rule the flags ask for, checked (before any stage is loaded): one InferError naming
  the flag. `rule` None = not given (default 'calibrated'); `offset` None = not given."""
  if offset is not None:
    if rule is not None:
      raise InferError(f'--offset={offset!r} and --rule={rule!r}: give one; --offset sets the '
                       'offset by hand, --rule computes it from the calibration rows')
    if not math.isfinite(float(offset)):
      raise InferError(f'--offset={offset!r}: expected a finite LPIPS offset (e.g. 0.02)')
    return Rule(MANUAL, manual_offset=float(offset))
  name = 'calibrated' if rule is None else rule
  if name not in RULES:
    raise InferError(f'--rule={rule!r}: expected one of {", ".join(RULES)}')
  a = default_alpha if alpha is None else alpha
  if not (isinstance(a, (int, float)) and 0 < float(a) < 1):
    raise InferError(f'--alpha={a!r}: expected the allowed share of violations, strictly '
                     'in (0, 1) (e.g. 0.1)')
  d = DEFAULT_DELTA if delta is None else delta
  if not (isinstance(d, (int, float)) and 0 < float(d) < 1):
    raise InferError(f'--delta={d!r}: expected the probability that the --rule=ltt bound '
                     'fails, strictly in (0, 1) (e.g. 0.1)')
  if name == 'paper':
    return Rule('paper')
  return Rule(name, alpha=float(a), delta=float(d) if name == 'ltt' else None)


def calibrate(rule: Rule, backbone: Backbone, workdir: str, pipeline: Any) -> Rule:
  """`rule` with the calibration rows it needs: the cached calibration split's true LPIPS and
  the trained predictor's predictions on it. A missing or stale cache ends in one error
  naming `train.py --stage=predictor`."""
  if rule.name not in ('calibrated', 'ltt'):
    return rule
  from fiancee_jax.train import predictor as tp  # noqa: PLC0415
  t0 = time.perf_counter()
  cal = predictor_data.cached(backbone, workdir, 'calibration')
  pred = tp.predict(pipeline.predictor, pipeline.params['predictor']['params'], cal['feats'])
  return dataclasses.replace(rule, pred_cal=np.asarray(pred, np.float64),
                             true_cal=np.asarray(cal['targets'], np.float64),
                             load_s=time.perf_counter() - t0)
