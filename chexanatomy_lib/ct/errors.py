"""Exceptions raised by `chexanatomy_lib.ct`.

Every error a user can cause with bad input is one of these, with a message that
names the file (or structure, or id) and the problem. Library errors from
nibabel, pydicom, zlib or numpy are caught at the boundary and re-raised as one
of these, chained with ``from`` so the original stays available for debugging.
"""

from __future__ import annotations

from pathlib import Path


class CTError(Exception):
    """Base class of every error raised by `chexanatomy_lib.ct`."""


# --- structure registry ---------------------------------------------------------

class RegistryError(CTError):
    """The structure registry file (``structures.yaml``) is malformed."""


class UnknownStructureError(RegistryError, LookupError):
    """A structure name, display name or synonym is not in the registry."""

    def __init__(self, text: str, suggestions: list[str]):
        self.text = text  # the text that was looked up
        self.suggestions = list(suggestions)  # closest known names
        hint = f"; closest: {', '.join(self.suggestions)}" if self.suggestions else ""
        super().__init__(f"unknown structure {text!r}{hint}")

    def __str__(self) -> str:  # LookupError would otherwise quote the message
        return self.args[0]


class UnknownLabelError(RegistryError, LookupError):
    """A label id is not defined for a task in the registry."""

    def __init__(self, ids: list[int], task: str):
        self.ids = sorted(int(i) for i in ids)  # the unknown ids
        self.task = task  # the TotalSegmentator task the ids were read in
        super().__init__(f"label id(s) {self.ids} are not defined for task {task!r} in the structure registry")

    def __str__(self) -> str:
        return self.args[0]


# --- CT input -------------------------------------------------------------------

class CTInputError(CTError):
    """A CT or label file (or folder) cannot be used; ``path`` names it."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)  # offending file or folder
        self.problem = problem  # what is wrong with it
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


class UnreadableImageError(CTInputError):
    """Not a NIfTI / DICOM file, truncated, or otherwise unreadable."""


class NotAVolumeError(CTInputError):
    """The image is not a 3D volume."""


class HURangeError(CTInputError):
    """CT intensities are not plausible Hounsfield units."""


class GeometryMismatchError(CTInputError):
    """A label volume's shape or affine differs from the CT's."""


class LabelContentError(CTInputError):
    """A labelmap holds ids or values the registry does not allow."""


class UnknownLabelFileError(CTInputError):
    """A label folder holds files whose names are not registry structures."""


class MissingLabelsError(CTInputError):
    """No labels were given and none can be computed here."""


class DicomSeriesError(CTInputError):
    """A DICOM folder is not one consistent axial series."""


class ManifestError(CTInputError):
    """A data manifest is malformed or points to missing files."""


class ChecksumError(ManifestError):
    """A file's sha256 differs from the one in its manifest."""


# --- projected dataset ----------------------------------------------------------

class DatasetError(CTError):
    """A projected dataset on disk is missing, incomplete or inconsistent,
    or a writer was given data that does not fit the format."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)  # the dataset folder or file
        self.problem = problem  # what is wrong
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")
