"""Few-shot adaptation to novel localisation tasks: which images a k-shot run learns
from, and how the runs are summarised. Training itself is the models' own
(`chexanatomy_lib.vlm.train`, `chexanatomy_lib.unet.train`, both on the one loop of
`chexanatomy_lib.training`); this package adds tasks and sampling, not a loop.

- `chexanatomy_lib.fewshot.sampling`  eligible images, seeded nested k-shot draws, saved and read back
- `chexanatomy_lib.fewshot.adapt`     one k-shot run per start: fine-tune a saved VLM or U-Net, or a fresh one
- `chexanatomy_lib.fewshot.curves`    k-shot curves with intervals over seeds and images, area under the curve, the k that reaches full supervision, paired differences of two starts
"""
