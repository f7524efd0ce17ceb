"""PaliGemma for chest-radiograph anatomy: prompts, models, training, decoding.

Submodules (import what you need; this package itself imports nothing heavy):

- `chexanatomy_lib.vlm.tokenizer`  offline tokenizer + `PaliGemmaProcessor` for tiny models
- `chexanatomy_lib.vlm.model`      tiny random models, real checkpoints, LoRA, checkpoints on disk
- `chexanatomy_lib.vlm.tasks`      multi-task prompt/target samples from the projected dataset
- `chexanatomy_lib.vlm.train`      the Accelerate training loop (resumable)
- `chexanatomy_lib.vlm.decode`     constrained and free decoding, masks from tokens
- `chexanatomy_lib.vlm.predict`    test-split predictions, the checkpoint folder, the `segment` interface
- `chexanatomy_lib.vlm.figures`    loss curve, task examples, overlays, comparison table
"""
