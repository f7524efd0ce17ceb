"""The projected dataset: DRR images, per-structure 2D masks and their index.

This module is the only reader and writer of the on-disk format (see
CONTRIBUTING.md, "Projected dataset"):

=================  ===============================================================
``dataset.json``   format version, image size, structure list (channel order),
                   ``meta`` (pixel spacing, view geometry, mask threshold,
                   creation parameters), number of images
``index.csv``      one row per image: ``image_id, case_id, copy_id, view, split``
                   then pose columns
``images.npy``     ``float32 [N, H, W]`` in [0, 1], displayed radiograph (white = dense)
``masks.npy``      ``uint8 [N, S, H, ceil(W/8)]`` = ``np.packbits(masks, axis=-1)``
``absent.npy``     ``bool [N, S]`` structure not in the image at all
``truncated.npy``  ``bool [N, S]`` structure cut by the CT's field of view
``splits.json``    which case (or copy) ids went to train/val/test, and the rule
=================  ===============================================================

Writing streams each image to disk as it is added, so a dataset never has to
fit in memory; the folder appears at its final path only when complete.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DatasetError, RegistryError
from .geometry import VIEWS

FORMAT_NAME = "chexanatomy.projected_dataset"
FORMAT_VERSION = 1
REQUIRED_META = ("pixel_spacing_mm", "view_geometry", "mask_threshold_mm")
INDEX_COLUMNS = ("image_id", "case_id", "copy_id", "view", "split")
ID_COLUMNS = ("image_id", "case_id", "copy_id")
#: Split names; also the values a data manifest may fix per case.
SPLITS = ("train", "val", "test")
FILES = ("dataset.json", "index.csv", "images.npy", "masks.npy", "absent.npy", "truncated.npy", "splits.json")
# NOTE: meta keys that may differ between shards of one synthesis run.
SHARD_META_KEYS = ("shard",)

_RAW = {  # raw append-only files written while the dataset grows -> final .npy name
    "images": "images.npy",
    "masks": "masks.npy",
    "absent": "absent.npy",
    "truncated": "truncated.npy",
}


def packed_width(width: int) -> int:
    """Bytes per packed mask row: ``ceil(width / 8)``."""
    return (int(width) + 7) // 8


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _check_structures(structures: Sequence[str], path: Path) -> list[str]:
    from .registry import load_registry

    reg = load_registry()
    structures = [str(s) for s in structures]
    if not structures:
        raise DatasetError(path, "the structure list is empty")
    unknown = [s for s in structures if s not in reg]
    if unknown:
        hints = []
        for s in unknown:
            try:
                hints.append(f"{s!r} (did you mean {reg.resolve(s).name!r}?)")
            except RegistryError:
                hints.append(repr(s))
        raise DatasetError(path, f"structures must be registry names; unknown: {', '.join(hints)}")
    dupes = sorted({s for s in structures if structures.count(s) > 1})
    if dupes:
        raise DatasetError(path, f"duplicate structures {dupes}")
    return structures


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples inside ``value`` to JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# --- splits ---------------------------------------------------------------------

def choose_split_unit(case_ids: Iterable[str]) -> str:
    """``"case"`` when there are several source CTs, ``"copy"`` when only one.

    Splitting by source CT keeps every image of a patient in one split; with a
    single CT (the bundled example) the deformed copies are the only unit left.
    """
    return "case" if len({str(c) for c in case_ids}) > 1 else "copy"


def make_splits(ids: Sequence[Any], unit: str = "case",
                fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> dict:
    """Seeded split of case (or copy) ids into train/val/test.

    ``ids``: the unit ids (``case_id`` values for ``unit="case"``, ``copy_id``
    values, unique across the dataset, for ``unit="copy"``); compared as
    strings. ``fractions``: (train, val, test), non-negative, summing to 1.
    Counts are ``floor(fraction * n)`` with the remainder going to the largest
    fractional parts; a split with a positive fraction gets at least one id
    when there are enough ids. Returns the dict saved as ``splits.json``::

        {"unit", "seed", "fractions": {split: f}, "rule": str,
         "assignment": {"train": [ids], "val": [ids], "test": [ids]}}

    The same ``ids`` (in any order), ``fractions`` and ``seed`` always give the
    same assignment.
    """
    if unit not in ("case", "copy"):
        raise ValueError(f"unit must be 'case' or 'copy', not {unit!r}")
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    keys = sorted({str(i) for i in ids})
    if len(keys) != len(ids):
        raise ValueError("split ids must be unique")
    n = len(keys)
    counts = np.floor(fr * n).astype(int)
    for k in np.argsort(-(fr * n - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    for k in range(3):  # a wanted split should not come out empty
        if fr[k] > 0 and counts[k] == 0 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[k] += 1
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [keys[i] for i in order]
    bounds = np.cumsum(counts)
    assignment = {
        name: sorted(shuffled[start:stop])
        for name, start, stop in zip(SPLITS, (0, bounds[0], bounds[1]), bounds)
    }
    rule = (f"{n} {unit} ids sorted as strings, permuted with numpy default_rng(seed={seed}), "
            f"then cut into train/val/test counts {counts.tolist()} from fractions {fr.tolist()}; "
            f"every image of one {unit} id is in the same split")
    return {"unit": unit, "seed": int(seed), "fractions": dict(zip(SPLITS, fr.tolist())),
            "rule": rule, "assignment": assignment}


def split_lookup(splits: dict) -> dict[str, str]:
    """``{unit id: split}`` from a splits dict; raises if an id is in two splits."""
    out: dict[str, str] = {}
    for split, ids in splits["assignment"].items():
        for i in ids:
            if out.setdefault(str(i), split) != split:
                raise DatasetError(None, f"{splits['unit']} id {i!r} is in both {out[str(i)]!r} and {split!r}")
    return out


def _unit_column(unit: str) -> str:
    return {"case": "case_id", "copy": "copy_id"}[unit]


def _splits_from_rows(rows: list[dict], path: Path) -> dict:
    """Splits recorded from the rows themselves when the writer got none."""
    for unit in ("case", "copy"):
        col = _unit_column(unit)
        seen: dict[str, str] = {}
        if all(seen.setdefault(str(r[col]), r["split"]) == r["split"] for r in rows):
            assignment = {s: sorted(k for k, v in seen.items() if v == s) for s in SPLITS}
            return {"unit": unit, "seed": None, "fractions": None, "assignment": assignment,
                    "rule": f"recorded from index.csv: each {unit} id has one split (not drawn by make_splits)"}
    raise DatasetError(path, "a copy_id appears in more than one split (data leak); "
                             "assign splits per case or per copy (see make_splits)")


# --- writing --------------------------------------------------------------------

class DatasetWriter:
    """Writes a projected dataset image by image.

    Everything goes into ``<path>.partial`` first; `close` turns the raw
    append-only files into the final ``.npy`` files and renames the folder to
    ``path``. Used as a context manager, an exception inside the ``with``
    block deletes the partial folder, so nothing is left at ``path``.

    >>> with DatasetWriter(out, ["heart", "lung_left"], 256, meta) as w:
    ...     w.add(image, masks, absent, truncated, row)
    """

    def __init__(
        self,
        path: str | Path,  # final dataset folder (must not exist unless overwrite=True)
        structures: Sequence[str],  # registry names, in channel order
        image_size: int,  # H = W of every image (pixels)
        meta: dict,  # pixel_spacing_mm, view_geometry, mask_threshold_mm, creation parameters (JSON-able)
        splits: dict | None = None,  # make_splits() result; None: recorded from the rows' split column
        overwrite: bool = False,  # replace an existing dataset at `path` on close
    ):
        self.path = Path(path)
        self.structures = _check_structures(structures, self.path)
        self.image_size = int(image_size)
        if self.image_size <= 0:
            raise DatasetError(self.path, f"image_size must be positive, got {image_size}")
        if not isinstance(meta, dict):
            raise DatasetError(self.path, "meta must be a dict")
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise DatasetError(self.path, f"meta lacks required keys {missing} (see REQUIRED_META)")
        self.meta = _jsonable(meta)
        try:  # fail now, not at close
            json.dumps(self.meta)
        except (TypeError, ValueError) as err:
            raise DatasetError(self.path, f"meta must be JSON-serialisable: {err}") from err
        self.splits = splits
        self._split_of = split_lookup(splits) if splits is not None else None
        if self.path.exists() and not overwrite:
            raise DatasetError(self.path, "already exists (pass overwrite=True to replace it)")
        self.overwrite = overwrite
        self.partial = _partial_path(self.path)
        if self.partial.exists():  # left over from an interrupted run of this writer
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self._files = {k: open(self.partial / f"{k}.raw", "wb") for k in _RAW}
        self._rows: list[dict] = []
        self._ids: set[str] = set()
        self._columns: list[str] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._rows)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _fail(self, problem: str) -> DatasetError:
        return DatasetError(self.path, f"image {len(self._rows)}: {problem}")

    def _check_row(self, row: dict) -> dict:
        if self._closed:
            raise DatasetError(self.path, "writer is closed")
        missing = [c for c in INDEX_COLUMNS if c not in row]
        if missing:
            raise self._fail(f"row lacks columns {missing}")
        row = {str(k): _jsonable(v) for k, v in row.items()}
        nested = [k for k, v in row.items() if isinstance(v, (list, dict))]
        if nested:
            raise self._fail(f"row values must be scalars (one CSV cell each); {nested} are not")
        for c in ID_COLUMNS:
            row[c] = str(row[c])
            if not row[c]:
                raise self._fail(f"empty {c}")
        if row["view"] not in VIEWS:
            raise self._fail(f"view {row['view']!r} not one of {VIEWS}")
        if row["split"] not in SPLITS:
            raise self._fail(f"split {row['split']!r} not one of {SPLITS}")
        if row["image_id"] in self._ids:
            raise self._fail(f"duplicate image_id {row['image_id']!r}")
        columns = list(INDEX_COLUMNS) + [k for k in row if k not in INDEX_COLUMNS]
        if self._columns is None:
            self._columns = columns
        elif set(columns) != set(self._columns):
            raise self._fail(f"row columns {sorted(columns)} differ from the first row's {sorted(self._columns)}")
        if self._split_of is not None:
            unit = self.splits["unit"]
            key = row[_unit_column(unit)]
            if key not in self._split_of:
                raise self._fail(f"{unit} id {key!r} is not in the splits")
            if self._split_of[key] != row["split"]:
                raise self._fail(f"split {row['split']!r} but the splits put {unit} {key!r} in {self._split_of[key]!r}")
        return row

    def add(self, image: np.ndarray, masks: np.ndarray, absent: np.ndarray,
            truncated: np.ndarray, row: dict) -> None:
        """Append one image.

        ``image``: ``float32 [H, W]`` in [0, 1]; ``masks``: ``bool [S, H, W]`` in
        the writer's structure order; ``absent``, ``truncated``: ``bool [S]``
        (an absent structure must have an empty mask); ``row``: ``image_id``
        (unique), ``case_id``, ``copy_id``, ``view`` (``pa``/``lateral``),
        ``split`` (``train``/``val``/``test``) plus pose columns, the same keys
        for every image.
        """
        size, s = self.image_size, len(self.structures)
        image = np.asarray(image)
        if image.shape != (size, size):
            raise self._fail(f"image shape {image.shape}, expected {(size, size)}")
        if not np.issubdtype(image.dtype, np.floating):
            raise self._fail(f"image dtype {image.dtype}, expected float32 in [0, 1]")
        image = image.astype(np.float32, copy=False)
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise self._fail(f"image values must be finite and in [0, 1] (min {np.nanmin(image)}, max {np.nanmax(image)})")
        masks = np.asarray(masks)
        if masks.shape != (s, size, size) or masks.dtype != np.bool_:
            raise self._fail(f"masks {masks.dtype} {masks.shape}, expected bool {(s, size, size)}")
        flags = []
        for name, a in (("absent", absent), ("truncated", truncated)):
            a = np.asarray(a)
            if a.shape != (s,) or a.dtype != np.bool_:
                raise self._fail(f"{name} {a.dtype} {a.shape}, expected bool {(s,)}")
            flags.append(a)
        nonempty = masks.reshape(s, -1).any(axis=1)
        bad = [self.structures[k] for k in np.flatnonzero(flags[0] & nonempty)]
        if bad:
            raise self._fail(f"structures marked absent have non-empty masks: {bad}")
        self._append(image, np.packbits(masks, axis=-1), flags[0], flags[1], row)

    def add_packed(self, image: np.ndarray, packed: np.ndarray, absent: np.ndarray,
                   truncated: np.ndarray, row: dict) -> None:
        """:meth:`add` with the masks already packed as stored: ``packed`` ``uint8 [S, H,
        ceil(W/8)]`` = ``np.packbits(masks, axis=-1)`` (e.g. by :func:`pack_masks` on a GPU)."""
        size, s = self.image_size, len(self.structures)
        image = np.asarray(image)
        if image.shape != (size, size) or not np.issubdtype(image.dtype, np.floating):
            raise self._fail(f"image {image.dtype} {image.shape}, expected float32 {(size, size)}")
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise self._fail(f"image values must be finite and in [0, 1] (min {np.nanmin(image)}, max {np.nanmax(image)})")
        packed = np.asarray(packed)
        if packed.shape != (s, size, (size + 7) // 8) or packed.dtype != np.uint8:
            raise self._fail(f"packed masks {packed.dtype} {packed.shape}, expected uint8 {(s, size, (size + 7) // 8)}")
        absent, truncated = np.asarray(absent), np.asarray(truncated)
        for name, a in (("absent", absent), ("truncated", truncated)):
            if a.shape != (s,) or a.dtype != np.bool_:
                raise self._fail(f"{name} {a.dtype} {a.shape}, expected bool {(s,)}")
        bad = [self.structures[k] for k in np.flatnonzero(absent & packed.reshape(s, -1).any(axis=1))]
        if bad:
            raise self._fail(f"structures marked absent have non-empty masks: {bad}")
        self._append(image.astype(np.float32, copy=False), packed, absent, truncated, row)

    def _append(self, image: np.ndarray, packed: np.ndarray, absent: np.ndarray,
                truncated: np.ndarray, row: dict) -> None:
        """Append already-validated arrays (``packed``: ``uint8 [S, H, ceil(W/8)]``)."""
        row = self._check_row(row)
        self._files["images"].write(np.ascontiguousarray(image, dtype=np.float32).tobytes())
        self._files["masks"].write(np.ascontiguousarray(packed, dtype=np.uint8).tobytes())
        self._files["absent"].write(np.ascontiguousarray(absent, dtype=np.bool_).tobytes())
        self._files["truncated"].write(np.ascontiguousarray(truncated, dtype=np.bool_).tobytes())
        self._rows.append(row)
        self._ids.add(row["image_id"])

    def close(self) -> Path:
        """Finish the files and move the dataset to its final path; returns it."""
        if self._closed:
            return self.path
        try:
            import pandas as pd

            for f in self._files.values():
                f.close()
            n, s, size = len(self._rows), len(self.structures), self.image_size
            shapes = {
                "images": ((n, size, size), np.float32),
                "masks": ((n, s, size, packed_width(size)), np.uint8),
                "absent": ((n, s), np.bool_),
                "truncated": ((n, s), np.bool_),
            }
            for key, (shape, dtype) in shapes.items():
                raw = self.partial / f"{key}.raw"
                with open(self.partial / _RAW[key], "wb") as out, open(raw, "rb") as src:
                    np.lib.format.write_array_header_1_0(out, {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                        "fortran_order": False, "shape": shape})
                    shutil.copyfileobj(src, out, 16 << 20)
                raw.unlink()
            columns = self._columns or list(INDEX_COLUMNS)
            pd.DataFrame(self._rows, columns=columns).to_csv(self.partial / "index.csv", index=False)
            splits = self.splits if self.splits is not None else _splits_from_rows(self._rows, self.path)
            (self.partial / "splits.json").write_text(json.dumps(_jsonable(splits), indent=2))
            info = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "image_size": size,
                    "num_images": n, "structures": self.structures, "meta": self.meta}
            (self.partial / "dataset.json").write_text(json.dumps(info, indent=2))
            if self.path.exists():  # overwrite=True was checked at construction
                shutil.rmtree(self.path)
            self.partial.rename(self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written so far; nothing is left at ``path``."""
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.partial, ignore_errors=True)
        self._closed = True


# --- reading --------------------------------------------------------------------

class ProjectedDataset:
    """Read access to a projected dataset folder (validated on open).

    Attributes: ``structures`` (registry names, channel order), ``image_size``,
    ``meta`` (dict), ``index`` (DataFrame, one row per image; id columns are
    str), ``splits`` (dict of ``splits.json``), ``images`` (``float32
    [N, H, W]`` memmap in [0, 1]), ``absent``/``truncated`` (``bool [N, S]``).
    Raises `DatasetError` naming the file when anything is missing or
    inconsistent.
    """

    def __init__(self, path: str | Path):  # path: the dataset folder
        import pandas as pd

        self.path = Path(path)
        if not self.path.is_dir():
            raise DatasetError(self.path, "no projected dataset here (folder missing)")
        missing = [f for f in FILES if not (self.path / f).is_file()]
        if missing:
            raise DatasetError(self.path, f"incomplete projected dataset, missing {missing}")
        info = self._json("dataset.json")
        if info.get("format") != FORMAT_NAME or info.get("format_version") != FORMAT_VERSION:
            raise DatasetError(self.path / "dataset.json",
                               f"format {info.get('format')!r} version {info.get('format_version')!r}; "
                               f"this library reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
        try:
            self.structures: list[str] = list(info["structures"])
            self.image_size: int = int(info["image_size"])
            self.meta: dict = dict(info["meta"])
            n = int(info["num_images"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(self.path / "dataset.json", f"missing or invalid field: {err}") from err
        self.splits: dict = self._json("splits.json")
        try:
            # NOTE: ids stay strings exactly as written ("007", "NA"); only the
            # other (pose) columns read empty cells as NaN.
            header = pd.read_csv(self.path / "index.csv", nrows=0).columns
            self.index = pd.read_csv(self.path / "index.csv", dtype={c: str for c in ID_COLUMNS},
                                     keep_default_na=False,
                                     na_values={c: ["", "nan", "NaN"] for c in header if c not in ID_COLUMNS})
        except (ValueError, pd.errors.ParserError) as err:
            raise DatasetError(self.path / "index.csv", f"unreadable: {err}") from err
        lacking = [c for c in INDEX_COLUMNS if c not in self.index.columns]
        if lacking:
            raise DatasetError(self.path / "index.csv", f"lacks columns {lacking}")
        if len(self.index) != n:
            raise DatasetError(self.path / "index.csv", f"{len(self.index)} rows, dataset.json says {n} images")
        if self.index["image_id"].duplicated().any():
            dupes = self.index["image_id"][self.index["image_id"].duplicated()].tolist()[:5]
            raise DatasetError(self.path / "index.csv", f"duplicate image_id values {dupes}")
        s, size = len(self.structures), self.image_size
        self.images = self._npy("images.npy", (n, size, size), np.float32, mmap=True)
        self._masks = self._npy("masks.npy", (n, s, size, packed_width(size)), np.uint8, mmap=True)
        self.absent = self._npy("absent.npy", (n, s), np.bool_, mmap=False)
        self.truncated = self._npy("truncated.npy", (n, s), np.bool_, mmap=False)
        self._channel = {name: k for k, name in enumerate(self.structures)}

    def _json(self, name: str) -> dict:
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, ValueError) as err:
            raise DatasetError(self.path / name, f"not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise DatasetError(self.path / name, "expected a JSON object")
        return data

    def _npy(self, name: str, shape: tuple, dtype: type, mmap: bool) -> np.ndarray:
        file = self.path / name
        try:
            # NOTE: numpy cannot memory-map an empty array; read those directly.
            arr = np.load(file, mmap_mode="r" if mmap and 0 not in shape else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DatasetError(file, f"unreadable .npy file: {err}") from err
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise DatasetError(file, f"holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
        return arr

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (f"ProjectedDataset({str(self.path)!r}: {len(self)} images, "
                f"{len(self.structures)} structures, {self.image_size} px)")

    def channel(self, name: str) -> int:
        """Channel index of a structure (registry name)."""
        try:
            return self._channel[name]
        except KeyError:
            raise DatasetError(self.path, f"structure {name!r} is not in this dataset; "
                                          f"it has {self.structures}") from None

    def masks(self, i: int) -> np.ndarray:
        """Masks of image ``i``: ``bool [S, H, W]`` in ``structures`` order."""
        return np.unpackbits(self._masks[i], axis=-1, count=self.image_size).astype(bool)

    def mask(self, i: int, name: str) -> np.ndarray:
        """Mask of one structure in image ``i``: ``bool [H, W]``."""
        return np.unpackbits(self._masks[i, self.channel(name)], axis=-1, count=self.image_size).astype(bool)

    def masks_for(self, indices: Sequence[int] | np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
        """Masks of several images: ``bool [n, s, H, W]`` (``s`` = len(names) or S)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        channels = slice(None) if names is None else [self.channel(n) for n in names]
        packed = self._masks[idx][:, channels]
        return np.unpackbits(packed, axis=-1, count=self.image_size).astype(bool)

    @property
    def packed_masks(self) -> np.ndarray:
        """The stored masks, ``uint8 [N, S, H, ceil(W/8)]`` (memmap)."""
        return self._masks

    def split_indices(self, split: str, view: str | None = None) -> np.ndarray:
        """Row indices (``int64``, ascending) of one split, optionally one view."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        if view is not None and view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS} or None, not {view!r}")
        keep = (self.index["split"] == split).to_numpy()
        if view is not None:
            keep = keep & (self.index["view"] == view).to_numpy()
        return np.flatnonzero(keep).astype(np.int64)

    def present_masks(self, indices: Sequence[int], structures: Sequence[str] | None = None,
                      exclude_truncated: bool = False):
        """The non-empty masks of some images, one row each: ``(bool [M, H, W], table)``.

        The table (pandas) has columns ``index, image_id, view, structure``, one row per
        mask in the same order. Absent structures are skipped; truncated ones too when
        ``exclude_truncated``. ``structures``: which (default: all, dataset order).
        """
        import pandas as pd

        names = list(self.structures) if structures is None else list(structures)
        ch = [self.structures.index(n) for n in names]
        masks, rows = [], []
        for i in indices:
            m = self.masks_for([i], names)[0]
            keep = m.reshape(len(names), -1).any(1)
            if exclude_truncated:
                keep &= ~self.truncated[i, ch]
            for k in np.flatnonzero(keep):
                rows.append({"index": int(i), "image_id": self.index["image_id"].iloc[i],
                             "view": self.index["view"].iloc[i], "structure": names[k]})
            masks.append(m[keep])
        size = int(self.image_size)
        stacked = np.concatenate(masks) if masks else np.zeros((0, size, size), bool)
        return stacked, pd.DataFrame(rows, columns=["index", "image_id", "view", "structure"])


def pack_masks(masks):
    """``np.packbits(masks, axis=-1)`` for a torch ``bool [..., W]`` tensor, on its own
    device: ``uint8 [..., ceil(W/8)]``, first pixel in the high bit (as stored in
    ``masks.npy``). Packing on a GPU moves an eighth of the bytes to the host."""
    import torch

    w = masks.shape[-1]
    pad = (-w) % 8
    m = masks.to(torch.uint8)
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=m.device)
    return (m.reshape(*m.shape[:-1], -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)


# --- shards ---------------------------------------------------------------------

def merge_shards(shard_paths: Sequence[str | Path], out_path: str | Path, overwrite: bool = False) -> Path:
    """Concatenate datasets written by ``--shard i/n`` runs into one dataset.

    Shards must agree on structures, image size and ``meta`` (apart from
    ``SHARD_META_KEYS``); non-empty shards also on index columns and splits
    (one `make_splits` result given to every shard), or all carry splits
    recorded from their rows, which are then recorded again over all rows
    (refusing a case in two splits). No image_id may occur twice. Masks are
    copied packed, shard by shard, image by image. Returns ``out_path``.
    """
    if not shard_paths:
        raise DatasetError(out_path, "no shards to merge")
    shards = [ProjectedDataset(p) for p in shard_paths]
    first = shards[0]

    def common_meta(ds: ProjectedDataset) -> dict:
        return {k: v for k, v in ds.meta.items() if k not in SHARD_META_KEYS}

    for ds in shards[1:]:
        for what, a, b in (("structures", first.structures, ds.structures),
                           ("image_size", first.image_size, ds.image_size),
                           ("meta", common_meta(first), common_meta(ds))):
            if a != b:
                raise DatasetError(ds.path, f"shard {what} differ from those of {first.path}")
    filled = [ds for ds in shards if len(ds)] or [first]  # empty shards add nothing
    for ds in filled[1:]:
        if sorted(ds.index.columns) != sorted(filled[0].index.columns):
            raise DatasetError(ds.path, f"shard index columns differ from those of {filled[0].path}")
    splits: dict | None = filled[0].splits
    if any(ds.splits != splits for ds in filled[1:]):
        if not all(ds.splits.get("seed") is None for ds in filled):
            raise DatasetError(out_path, "shards were written with different splits; "
                                         "draw one make_splits() result and give it to every shard")
        splits = None  # each shard recorded its own rows' splits: record again over all rows
    counts = Counter(i for ds in shards for i in ds.index["image_id"])
    dupes = sorted(i for i, c in counts.items() if c > 1)
    if dupes:
        raise DatasetError(out_path, f"image_id values occur in more than one shard: {dupes[:10]}")
    meta = common_meta(first) | {"merged_shards": len(shards)}
    with DatasetWriter(out_path, first.structures, first.image_size, meta,
                       splits=splits, overwrite=overwrite) as w:
        for ds in shards:
            records = ds.index.to_dict("records")
            for i, row in enumerate(records):
                w._append(ds.images[i], ds.packed_masks[i], ds.absent[i], ds.truncated[i], row)
    return Path(out_path)
