"""CT input, the structure registry, DRR projection and the projected dataset.

Import the submodules you need; this package imports nothing heavy:

- `chexanatomy_lib.ct.registry`  structure names, ids, synonyms (`load_registry`)
- `chexanatomy_lib.ct.io`        CT + label loading (`load_case`, `load_example_case`)
- `chexanatomy_lib.ct.manifest`  data manifests (`load_manifest`)
- `chexanatomy_lib.ct.synthesis` rendering a projected dataset (`synthesize_dataset`, `CaseRenderer`)
- `chexanatomy_lib.ct.rerender`  masks of dataset images rendered again at other sizes (`rerender_masks`)
- `chexanatomy_lib.ct.shift`     acquisition shifts rendered from the CT (`RENDERED_SHIFTS`, `render_shifted`)
- `chexanatomy_lib.ct.lesions`   synthetic nodules and effusions written into the CT (`synthesize_lesion_dataset`)
- `chexanatomy_lib.ct.dataset`   the projected dataset (`DatasetWriter`, `ProjectedDataset`)
- `chexanatomy_lib.ct.figures`   chapter 1's figures of radiographs and masks
- `chexanatomy_lib.ct.export`    PNG and COCO exports of a projected dataset
- `chexanatomy_lib.ct.errors`    the exceptions all of these raise
"""

from .errors import CTError, CTInputError, DatasetError
from .registry import Structure, load_registry

__all__ = ["CTError", "CTInputError", "DatasetError", "Structure", "load_registry"]
