"""Evaluation: everything that scores and compares, for every model alike.

- `chexanatomy_lib.evaluation.metrics`      Dice, IoU, HD95, box IoU, bootstrap intervals, invalid rate
- `chexanatomy_lib.evaluation.predictions`  the predictions format on disk, `predict_split` for any segmenter
- `chexanatomy_lib.evaluation.baselines`    the mean-training-mask baseline
- `chexanatomy_lib.evaluation.evaluate`     `evaluate_predictions`, `score_images`, `score_masks`, `summarize` (the one summary)
- `chexanatomy_lib.evaluation.perturbations` shifts made on the image (in-plane geometry, appearance)
- `chexanatomy_lib.evaluation.shift`        shifted sets of held-out images, their scores, robustness and drop differences
- `chexanatomy_lib.evaluation.domain_gap`   shape, intensity and texture statistics of real and projected sets, and their distances
- `chexanatomy_lib.evaluation.clinical`     clinical measures from masks (cardiothoracic ratio)
- `chexanatomy_lib.evaluation.figures`      the palette, comparison tables, bar charts, curves, forest plots, agreement and overlays

Submodules are imported explicitly (``from chexanatomy_lib.evaluation.metrics import dice``)
so that importing the package stays light. Nothing here depends on a particular model.
"""
