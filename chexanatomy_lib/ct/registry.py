"""The structure registry: anatomical structure names, ids and synonyms.

The registry is data (``structures.yaml`` beside this module); this module only
loads, validates and queries it. Every other part of the library refers to a
structure by its canonical name (TotalSegmentator spelling, e.g.
``"lung_upper_lobe_left"``, ``"rib_right_4"``) and asks the registry for display
names, synonyms, categories, label ids and display groups (:func:`structure_groups`,
:func:`group_of`).

Besides anatomy it names the synthetic lesions of :mod:`~chexanatomy_lib.ct.lesions`
(category ``lesion``, ids of their own task ``lesion``, labelmap values
``LESION_LABEL_BASE + id``; no ordinary CT holds them).

>>> reg = load_registry()
>>> reg.resolve("Cardiac silhouette").name
'heart'
>>> [s.name for s in reg.from_label_ids([51, 73])]
['heart', 'clavicula_left']
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

from .errors import RegistryError, UnknownLabelError, UnknownStructureError

REGISTRY_PATH = Path(__file__).with_name("structures.yaml")

CATEGORIES = ("lung", "heart", "vessel", "airway", "rib", "vertebra", "bone", "organ", "lesion", "other")

#: Synthetic lesions (category ``lesion``, written into a CT by :mod:`~chexanatomy_lib.ct.lesions`)
#: have ids of their own task ``lesion``, not TotalSegmentator ids; in a labelmap (or a working
#: volume's ``label_ids``) lesion ``k`` takes the value ``LESION_LABEL_BASE + k``, above every
#: ``total`` id, so a CT without lesions never holds one.
LESION_LABEL_BASE = 1000

#: Display groups of structures (figures and per-group scores), in display order:
#: group -> (category, name prefix); a structure joins the first group whose
#: category (when given) and name prefix (when given) it matches.
GROUPS: dict[str, tuple[str | None, str | None]] = {
    "lungs": ("lung", None),
    "heart": ("heart", None),
    "clavicles": (None, "clavicula"),
    "ribs": ("rib", "rib_"),
    "spine": ("vertebra", None),
}


def normalize(text: str) -> str:
    """Lookup key of a name: lower case, ``_``/``-`` as spaces, runs of spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(text))).strip().lower()


@dataclass(frozen=True)
class Structure:
    """One anatomical structure of the registry (immutable; hashable by name)."""

    name: str  # canonical name, TotalSegmentator spelling ("clavicula_left")
    display: str  # human-readable name ("left clavicle")
    synonyms: tuple[str, ...]  # other names a prompt may use ("left collarbone", ...)
    category: str  # one of CATEGORIES
    ids: Mapping[str, int] = field(default_factory=dict)  # {task: label id}; empty for derived
    members: tuple[str, ...] = ()  # derived structures: names whose union this is; else empty
    minus: tuple[str, ...] = ()  # derived 2D structures: a pixel is left out where its ray crosses any of these
    excluded: bool = False  # dropped from supervision by the paper (fat, discs)
    note: str = ""  # free-text remark from the registry file
    snomed: tuple[str, str] | None = None  # SNOMED CT (code, meaning) where one exists (DICOM-SEG segment types)

    @property
    def is_derived(self) -> bool:
        """True for a union of other structures (``lung_left``, ``spine``, ...)."""
        return bool(self.members)

    @property
    def is_projection_derived(self) -> bool:
        """True for a structure defined on the radiograph: the members' projection minus
        the pixels whose rays cross a ``minus`` structure (``lung_field_left``, ...)."""
        return bool(self.minus)

    @property
    def label_value(self) -> int | None:
        """Its value in a labelmap: the ``total`` id, or ``LESION_LABEL_BASE`` + the ``lesion``
        id of a synthetic lesion; None for a structure with neither (derived, other tasks)."""
        if "total" in self.ids:
            return int(self.ids["total"])
        if "lesion" in self.ids:
            return LESION_LABEL_BASE + int(self.ids["lesion"])
        return None

    def __hash__(self) -> int:
        return hash(self.name)


class Registry:
    """Validated, queryable set of structures in file order.

    Built by `load_registry`; do not construct directly unless testing a
    custom registry file.
    """

    def __init__(self, structures: list[Structure], tasks: Mapping[str, str],
                 task_aliases: Mapping[str, str], source: Path):
        self._structures = list(structures)  # structures in registry order
        self.tasks = dict(tasks)  # task name -> description
        self._task_aliases = dict(task_aliases)  # alternative task name -> task name
        self.source = source  # the YAML file it was read from
        self._by_name = {s.name: s for s in self._structures}
        self._lookup: dict[str, str] = {}
        self._by_id: dict[str, dict[int, str]] = {t: {} for t in self.tasks}
        self._validate()

    # --- construction -------------------------------------------------------
    def _fail(self, problem: str) -> RegistryError:
        return RegistryError(f"{self.source}: {problem}")

    def _validate(self) -> None:
        seen: set[str] = set()
        for s in self._structures:
            if s.name in seen:
                raise self._fail(f"duplicate structure name {s.name!r}")
            seen.add(s.name)
            if s.category not in CATEGORIES:
                raise self._fail(f"structure {s.name!r}: category {s.category!r} not one of {CATEGORIES}")
            if s.members and s.ids:
                raise self._fail(f"structure {s.name!r}: a derived structure has members, not ids")
            if s.minus and not s.members:
                raise self._fail(f"structure {s.name!r}: 'minus' needs 'members' (the projection it is cut from)")
            for task, i in s.ids.items():
                if task not in self.tasks:
                    raise self._fail(f"structure {s.name!r}: unknown task {task!r} (declare it under 'tasks')")
                if not isinstance(i, int) or isinstance(i, bool) or i <= 0:
                    raise self._fail(f"structure {s.name!r}: id {i!r} for task {task!r} must be a positive integer")
                if task == "total" and i >= LESION_LABEL_BASE:
                    raise self._fail(f"structure {s.name!r}: `total` id {i} collides with lesion label values "
                                     f"(>= {LESION_LABEL_BASE})")
                if i in self._by_id[task]:
                    raise self._fail(f"task {task!r}: id {i} used by both {self._by_id[task][i]!r} and {s.name!r}")
                self._by_id[task][i] = s.name
            # every spelling maps to exactly one structure
            for text in (s.name, s.display, *s.synonyms):
                key = normalize(text)
                if not key:
                    raise self._fail(f"structure {s.name!r}: empty name, display name or synonym")
                owner = self._lookup.setdefault(key, s.name)
                if owner != s.name:
                    raise self._fail(f"{text!r} names both {owner!r} and {s.name!r}")
        for s in self._structures:
            for m in s.members:
                if m not in self._by_name:
                    raise self._fail(f"derived structure {s.name!r}: unknown member {m!r}")
            for m in s.minus:
                if m not in self._by_name:
                    raise self._fail(f"derived structure {s.name!r}: unknown structure {m!r} in 'minus'")
                if self._by_name[m].minus:
                    raise self._fail(f"derived structure {s.name!r}: {m!r} in 'minus' is itself cut by 'minus'")
            self.expand(s.name)  # raises on cycles
        for alias, task in self._task_aliases.items():
            if task not in self.tasks:
                raise self._fail(f"task alias {alias!r} points to unknown task {task!r}")

    # --- queries --------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Canonical names in registry order."""
        return [s.name for s in self._structures]

    def __len__(self) -> int:
        return len(self._structures)

    def __iter__(self) -> Iterator[Structure]:
        return iter(self._structures)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Structure:
        """The structure with canonical name ``name`` (exact spelling).

        Raises `UnknownStructureError` listing the closest names.
        """
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise UnknownStructureError(str(name), self._closest(str(name))) from None

    def resolve(self, text: str) -> Structure:
        """The structure named by a canonical name, display name or synonym.

        Matching ignores case, and treats ``_``, ``-`` and runs of spaces alike:
        ``"Left Clavicle"``, ``"clavicula_left"`` and ``"left collarbone"`` all
        give ``clavicula_left``. Unknown text raises `UnknownStructureError`
        listing the closest names (difflib).
        """
        key = normalize(text)
        if key in self._lookup:
            return self._by_name[self._lookup[key]]
        raise UnknownStructureError(str(text), self._closest(str(text)))

    def _closest(self, text: str, n: int = 5) -> list[str]:
        matches = difflib.get_close_matches(normalize(text), list(self._lookup), n=n * 3, cutoff=0.5)
        out: list[str] = []
        for m in matches:
            name = self._lookup[m]
            if name not in out:
                out.append(name)
        return out[:n]

    def canonical_task(self, task: str) -> str:
        """Task name after aliases (``"heartchambers"`` -> ``"heartchambers_highres"``)."""
        task = self._task_aliases.get(task, task)
        if task not in self.tasks:
            raise RegistryError(f"unknown TotalSegmentator task {task!r}; known: {sorted(self.tasks)}")
        return task

    def label_table(self, task: str = "total") -> dict[int, str]:
        """``{label id: canonical name}`` of one task, ascending ids."""
        return dict(sorted(self._by_id[self.canonical_task(task)].items()))

    def from_label_ids(self, ids: Iterable[int], task: str = "total") -> list[Structure]:
        """Structures of label ids of a task, in the order given.

        ``ids``: integers (a numpy array works, e.g. ``np.unique(labelmap)``);
        0 (background) is skipped. Any id the task does not define raises
        `UnknownLabelError` naming all such ids.
        """
        table = self._by_id[self.canonical_task(task)]
        ids = [int(i) for i in ids]
        unknown = sorted({i for i in ids if i != 0 and i not in table})
        if unknown:
            raise UnknownLabelError(unknown, self.canonical_task(task))
        return [self._by_name[table[i]] for i in ids if i != 0]

    def derived(self) -> list[Structure]:
        """Structures defined as unions of members, in registry order."""
        return [s for s in self._structures if s.members]

    def expand(self, name: str) -> list[str]:
        """Non-derived structures that make up ``name`` (itself if not derived).

        ``expand("lungs")`` -> the five lobe names, in member order.
        """
        out: list[str] = []

        def visit(n: str, path: tuple[str, ...]) -> None:
            if n in path:
                raise self._fail(f"derived structures form a cycle: {' -> '.join((*path, n))}")
            s = self.get(n)
            if not s.members:
                if n not in out:
                    out.append(n)
                return
            for m in s.members:
                visit(m, (*path, n))

        visit(name, ())
        return out

    def included(self) -> list[Structure]:
        """Structures not marked ``excluded``, in registry order."""
        return [s for s in self._structures if not s.excluded]


def _structure_from_entry(entry: object, source: Path, index: int) -> Structure:
    if not isinstance(entry, dict) or "name" not in entry:
        raise RegistryError(f"{source}: entry {index} is not a mapping with a 'name'")
    allowed = {"name", "display", "synonyms", "category", "ids", "members", "minus", "excluded", "note", "snomed"}
    extra = set(entry) - allowed
    if extra:
        raise RegistryError(f"{source}: structure {entry['name']!r} has unknown keys {sorted(extra)}")
    for key in ("display", "category"):
        if not isinstance(entry.get(key), str):
            raise RegistryError(f"{source}: structure {entry['name']!r} needs a string {key!r}")
    synonyms = entry.get("synonyms") or []
    members = entry.get("members") or []
    minus = entry.get("minus") or []
    ids = entry.get("ids") or {}
    snomed = entry.get("snomed")
    if snomed is not None and not (isinstance(snomed, list) and len(snomed) == 2
                                   and str(snomed[0]).isdigit() and isinstance(snomed[1], str)):
        raise RegistryError(f"{source}: structure {entry['name']!r}: snomed must be [code, meaning], e.g. "
                            "[\"80891009\", \"Heart\"]")
    if not all(isinstance(v, list) for v in (synonyms, members, minus)) or not isinstance(ids, dict):
        raise RegistryError(f"{source}: structure {entry['name']!r}: synonyms/members/minus must be lists, "
                            "ids a mapping")
    return Structure(
        name=str(entry["name"]),
        display=entry["display"],
        synonyms=tuple(str(s) for s in synonyms),
        category=entry["category"],
        ids=MappingProxyType(dict(ids)),
        members=tuple(str(m) for m in members),
        minus=tuple(str(m) for m in minus),
        excluded=bool(entry.get("excluded", False)),
        note=str(entry.get("note", "")),
        snomed=(str(snomed[0]), snomed[1]) if snomed is not None else None,
    )


def read_registry(path: str | Path) -> Registry:
    """Read and validate a registry YAML file (uncached; see `load_registry`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RegistryError(f"{path}: cannot read structure registry: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("structures"), list):
        raise RegistryError(f"{path}: expected a mapping with a 'structures' list")
    if not isinstance(data.get("tasks"), dict):
        raise RegistryError(f"{path}: expected a 'tasks' mapping")
    structures = [_structure_from_entry(e, path, i) for i, e in enumerate(data["structures"])]
    return Registry(structures, data["tasks"], data.get("task_aliases") or {}, path)


@lru_cache(maxsize=8)
def _load_cached(path: str) -> Registry:
    return read_registry(path)


def load_registry(path: str | Path | None = None) -> Registry:
    """The structure registry (cached per file); ``path`` defaults to the bundled
    ``structures.yaml``. Raises `RegistryError` if the file is malformed
    (duplicate names, ids, display names or synonyms; unknown members, tasks or
    categories)."""
    return _load_cached(str(Path(path or REGISTRY_PATH).resolve()))


def _group(s: Structure) -> str | None:
    """The first of :data:`GROUPS` that ``s`` belongs to, or None."""
    for group, (category, prefix) in GROUPS.items():
        if (category is None or s.category == category) and (prefix is None or s.name.startswith(prefix)):
            return group
    return None


def structure_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Split canonical names into the :data:`GROUPS` lungs, heart, clavicles, ribs, spine
    (every group a key, in that order; names in the order given; others dropped)."""
    reg = load_registry()
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for n in names:
        g = _group(reg.get(n))
        if g is not None:
            out[g].append(n)
    return out


def group_of(names: Iterable[str]) -> dict[str, str]:
    """Canonical name -> its group in :data:`GROUPS` (``"other"`` when none), in the order given."""
    names = list(names)
    lookup = {n: g for g, ns in structure_groups(names).items() for n in ns}
    return {n: lookup.get(n, "other") for n in names}
