"""Inference with early exits (Sec. 3.2) and the threshold sweep that writes the report.

  inputs   reading and checking user inputs (thresholds, label PNGs, RGB images, data split
           examples, noises) and `BackboneInputs`, what each adapter's `infer_inputs()` gives
  engine   `Engine`: the compiled functions of one `core.pipeline.Pipeline` (owned by the
           caller), one routed input (`route_one`, `infer_file`), routed batches
  sweep    the sweep over the predictor's test split (Sec. 4.1 / 4.2), written by `report`
  report   figures + report.md + summary.json of a sweep
"""
