"""The districts table matches the study's Table 4 (SEED.md) and loads in table order."""
from __future__ import annotations

import pytest

from nfed.common.errors import DataError
from nfed.data.districts import District, find_district, load_districts, read_districts_csv


def test_twenty_five_districts_in_table_order_with_study_values():
    districts = load_districts()
    assert len(districts) == 25
    assert [d.name for d in districts[:3]] == ["Gangnam-gu", "Gangdong-gu", "Gangbuk-gu"]
    assert districts[-1] == District("중랑구", "Jungnang-gu", 3132, 0.787, 0.8673, 10.20)
    assert sum(d.samples for d in districts) == 40750
    gwangjin = find_district("Gwangjin-gu")
    assert (gwangjin.name_ko, gwangjin.samples, gwangjin.f1_local, gwangjin.f1_federated, gwangjin.gain_pct) == \
        ("광진구", 450, 0.4924, 0.8302, 68.60)
    mean_local = sum(d.f1_local for d in districts) / 25
    mean_federated = sum(d.f1_federated for d in districts) / 25
    assert round(mean_local, 3) == 0.657 and round(mean_federated, 3) == 0.852


def test_gain_column_agrees_with_f1_columns():
    for d in load_districts():
        assert abs(100 * (d.f1_federated - d.f1_local) / d.f1_local - d.gain_pct) < 0.05, d.name


def test_find_district_accepts_short_and_korean_names():
    assert find_district("gangnam").name == "Gangnam-gu"
    assert find_district("중구").name == "Jung-gu"
    with pytest.raises(DataError, match="unknown district 'Atlantis'"):
        find_district("Atlantis")


def test_bad_csv_names_file_and_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("name_ko,name,samples,f1_local,f1_federated,gain_pct\n강남구,Gangnam-gu,many,0.1,0.2,3\n",
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv: line 2"):
        read_districts_csv(path)
    path.write_text("name,samples\nX,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing column"):
        read_districts_csv(path)
