"""PaliGemma for chest-radiograph anatomy: prompts, models, training, decoding.
It computes no metric (scoring is `chexanatomy_lib.evaluation`'s).

Submodules (import what you need; this package itself imports nothing heavy):

- `chexanatomy_lib.vlm.tokenizer`  offline tokenizer + `PaliGemmaProcessor` for tiny models
- `chexanatomy_lib.vlm.model`      tiny random models, real checkpoints, LoRA, checkpoints on disk
- `chexanatomy_lib.vlm.tasks`      multi-task prompt/target samples from the projected dataset
- `chexanatomy_lib.vlm.train`      batches and token loss in the project's training loop
- `chexanatomy_lib.vlm.decode`     constrained and free decoding, masks from tokens
- `chexanatomy_lib.vlm.predict`    `VLMSegmenter` (`.predict`, `.segment`) and the checkpoint folder
- `chexanatomy_lib.vlm.figures`    loss curve and task examples (comparisons: `chexanatomy_lib.evaluation.figures`)
"""
