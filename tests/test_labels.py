"""JSON label format: the shipped schema is interpreted by nfed's own validator; masks from polygons."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from nfed.common.errors import DataError
from nfed.common.resources import data_file
from nfed.data import labels


def document(**overrides):
    doc = labels.label_document("0007", "Gangnam-gu", "0007_past.png", "0007_current.png", 64, 64,
                                [("new", [(2, 2), (20, 2), (20, 12), (2, 12)]),
                                 ("demolished", [(30, 30), (40, 30), (40, 40)]),
                                 ("renewed", [(0, 50), (10, 50), (10, 64), (0, 64)])])
    doc.update(overrides)
    return doc


def error_of(doc, name="labels/0007.json") -> str:
    with pytest.raises(DataError) as info:
        labels.parse_label(doc, name)
    return str(info.value)


def test_schema_file_is_draft07_and_lists_the_four_types():
    schema = json.loads(data_file("label_schema.json").read_text(encoding="utf-8"))
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    change = schema["properties"]["changes"]["items"]
    assert change["properties"]["type"]["enum"] == list(labels.CHANGE_TYPES)
    assert labels.CHANGE_CODES == {"new": 1, "demolished": 2, "renewed": 3, "recoloured": 4}


def test_valid_label_parses():
    label = labels.parse_label(document(), "labels/0007.json")
    assert (label.tile_id, label.district, label.width, label.height) == ("0007", "Gangnam-gu", 64, 64)
    assert label.past.name == "0007_past.png" and label.past.parent.name == "labels"
    assert [c.type for c in label.changes] == ["new", "demolished", "renewed"]


def test_unknown_change_type_names_file_and_field():
    doc = document()
    doc["changes"][2]["type"] = "built"
    assert error_of(doc) == ("labels/0007.json: changes[2].type: 'built' is not one of new, demolished, "
                             "renewed, recoloured")


def test_polygon_outside_tile():
    doc = document()
    doc["changes"][1]["polygon"][1] = [70, 30]
    assert error_of(doc) == "labels/0007.json: changes[1].polygon[1]: point (70, 30) lies outside the 64x64 tile"
    doc = document()
    doc["changes"][0]["polygon"][0] = [-1, 3]
    assert "changes[0].polygon[0][0]: -1 is less than the minimum 0" in error_of(doc)


def test_non_numeric_coordinates_and_other_schema_errors():
    doc = document()
    doc["changes"][0]["polygon"][3] = ["a", 12]
    assert error_of(doc) == "labels/0007.json: changes[0].polygon[3][0]: 'a' is not of type number"
    doc = document()
    doc["changes"][0]["polygon"][3] = [True, 12]
    assert "is not of type number" in error_of(doc)
    doc = document()
    doc["changes"][0]["polygon"] = [[1, 1], [2, 2]]
    assert "changes[0].polygon: has 2 item(s), needs at least 3" in error_of(doc)
    doc = document()
    del doc["size"]
    assert error_of(doc) == "labels/0007.json: size: required field is missing"
    doc = document(colour="red")
    assert error_of(doc) == "labels/0007.json: colour: unknown field"
    doc = document(size={"width": 64.5, "height": 64})
    assert "size.width: 64.5 is not of type integer" in error_of(doc)
    assert "(root): [] is not of type object" in error_of([])


def test_read_label_rejects_bad_json_and_nan(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json: not valid JSON"):
        labels.read_label(path)
    doc = document()
    text = json.dumps(doc).replace("[2, 2]", "[NaN, 2]", 1).replace("[2.0, 2.0]", "[NaN, 2.0]", 1)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json: not valid JSON \(NaN is not valid JSON"):
        labels.read_label(path)
    with pytest.raises(DataError, match=r"missing\.json: file not found"):
        labels.read_label(tmp_path / "missing.json")


def test_validator_rejects_schema_keywords_it_does_not_implement():
    with pytest.raises(ValueError, match="not supported.*pattern"):
        labels.validate_schema("x", {"type": "string", "pattern": "^x$"})


def test_rasterise_codes_and_order():
    label = labels.parse_label(document(), "x.json")
    mask = labels.rasterise(label)
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert mask[5, 10] == 1 and mask[32, 38] == 2 and mask[60, 5] == 3 and mask[45, 45] == 0
    # a later polygon paints over an earlier one
    doc = copy.deepcopy(document())
    doc["changes"].append({"type": "recoloured", "polygon": [[0, 0], [64, 0], [64, 8], [0, 8]]})
    mask = labels.rasterise(labels.parse_label(doc, "x.json"))
    assert mask[5, 10] == 4 and mask[10, 10] == 1
    # the rectangle 2..20 x 2..12 covers its outline pixels inclusive (Pillow fill semantics)
    rect = labels.rasterise_polygons(64, 64, [(1, [(2, 2), (20, 2), (20, 12), (2, 12)])])
    assert rect.sum() == 19 * 11


def test_shipped_example_label_is_valid():
    label = labels.read_label(data_file("fixtures/label_example.json"))
    assert [c.type for c in label.changes] == list(labels.CHANGE_TYPES)
    mask = labels.rasterise(label)
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 1, 2, 3, 4}
