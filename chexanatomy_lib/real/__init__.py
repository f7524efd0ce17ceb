"""Real chest radiographs and their annotations, read into the registry's names and the
project's conventions (patient's right on the image's left). Nothing here scores.

- `chexanatomy_lib.real.v7labs`  the 517 lung masks shipped inside the torchxrayvision wheel
- `chexanatomy_lib.real.readers` public sets users bring (JSRT/SCR, Montgomery, Shenzhen, CheXmask, VinDr-RibCXR, a folder) from a manifest (`read_real_set`)
"""
