"""DistrictPack: seeded shuffled batches, consistent augmentation, bounded memory, clear errors."""
from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
from conftest import DEVICES

from nfed.common import backend
from nfed.common.errors import DataError
from nfed.data import packformat
from nfed.data.packwriter import PackWriter, write_pack
from nfed.data.reader import DistrictPack, augment_tiles, list_packs


def marked_tiles(n: int, tile: int = 16, seed: int = 0):
    """Tiles whose mask is a function of the past image (red >= 128) and current = 255 - past, so any
    transform applied to one but not the others is detectable."""
    rng = np.random.default_rng(seed)
    past = rng.integers(0, 256, (n, tile, tile, 3), dtype=np.uint8)
    current = 255 - past
    mask = (past[..., 0] >= 128).astype(np.uint8) * rng.integers(1, 5, (n, 1, 1), dtype=np.uint8)
    return past, current, mask, [f"t{i:03d}" for i in range(n)]


@pytest.fixture
def small_pack(tmp_path):
    past, current, mask, ids = marked_tiles(20)
    path = tmp_path / "Mapo-gu.h5"
    write_pack(path, "Mapo-gu", {"train": (past, current, mask, ids),
                                 "val": (past[:3], current[:3], mask[:3], ["v0", "v1", "v2"])})
    return path, (past, current, mask, ids)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_shapes_types_and_device(small_pack, device):
    path, (past, current, mask, ids) = small_pack
    xp = backend.parse_device(device).xp
    with DistrictPack(path) as pack:
        assert (pack.district, pack.tile, pack.num_samples("train"), pack.num_samples("test")) == ("Mapo-gu", 16, 20, 0)
        batches = list(pack.batches("train", 8, shuffle=False, device=device))
        assert [len(b.ids) for b in batches] == [8, 8, 4]
        first = batches[0]
        assert isinstance(first.past, xp.ndarray) and isinstance(first.mask, xp.ndarray)
        assert first.past.dtype == np.float32 and first.past.shape == (8, 3, 16, 16)
        assert first.mask.dtype == np.int64 and first.mask.shape == (8, 16, 16)
        np.testing.assert_allclose(backend.to_numpy(first.past), past[:8].transpose(0, 3, 1, 2) / 255, atol=1e-6)
        np.testing.assert_allclose(backend.to_numpy(first.current), current[:8].transpose(0, 3, 1, 2) / 255,
                                   atol=1e-6)
        np.testing.assert_array_equal(backend.to_numpy(first.mask), mask[:8])
        assert first.ids == ids[:8]
        assert [len(b.ids) for b in pack.batches("train", 8, drop_last=True)] == [8, 8]
        assert list(pack.batches("test", 4)) == []


def test_shuffle_is_seeded(small_pack):
    path, _ = small_pack
    with DistrictPack(path) as pack:
        def order(seed):
            return [i for b in pack.batches("train", 6, seed=seed) for i in b.ids]
        assert order(3) == order(3)
        assert order(3) != order(4)
        assert sorted(order(3)) == sorted(pack.ids("train"))


def test_augmentation_is_the_same_for_both_dates_and_the_mask(small_pack):
    path, (past, _, mask, ids) = small_pack
    seen_transforms = set()
    with DistrictPack(path) as pack:
        for seed in range(3):
            first = [(b.past, b.current, b.mask, b.ids) for b in pack.batches("train", 5, augment=True, seed=seed)]
            again = [(b.past, b.current, b.mask, b.ids) for b in pack.batches("train", 5, augment=True, seed=seed)]
            for (p, c, m, batch_ids), (p2, c2, m2, ids2) in zip(first, again):
                assert batch_ids == ids2
                np.testing.assert_array_equal(p, p2)
                np.testing.assert_array_equal(m, m2)
                raw_past = np.rint(p * 255).astype(np.int64)
                np.testing.assert_array_equal(np.rint(c * 255).astype(np.int64), 255 - raw_past)
                np.testing.assert_array_equal(m > 0, raw_past[:, 0] >= 128)
                for k, tile_id in enumerate(batch_ids):
                    original = past[ids.index(tile_id)]
                    for code in range(8):
                        if np.array_equal(augment_tiles(original[None], original[None], mask[:1], [code])[0][0],
                                          raw_past[k].transpose(1, 2, 0)):
                            seen_transforms.add(code)
                            break
                    else:
                        raise AssertionError(f"{tile_id}: augmented tile is not a flip/rotation of the original")
    assert len(seen_transforms) >= 6  # the 8 dihedral transforms are all in use


def test_reading_stays_within_a_few_batches_of_memory(tmp_path):
    tile, n, batch = 64, 256, 4
    rng = np.random.default_rng(1)
    with PackWriter(tmp_path / "big.h5", district="Gangseo-gu", tile=tile, source="test", split_seed=0,
                    compression_level=1) as writer:
        block = rng.integers(0, 256, (8, tile, tile, 3), dtype=np.uint8)
        for i in range(n):
            writer.append("train", f"t{i}", block[i % 8], block[(i + 1) % 8], block[i % 8, :, :, 0] // 128)
    pack_bytes = n * tile * tile * (3 + 3 + 1)
    batch_bytes = batch * tile * tile * (3 * 4 * 2 + 8)  # float32 past + current, int64 mask
    with DistrictPack(tmp_path / "big.h5") as pack:
        tracemalloc.start()
        try:
            count = 0
            for b in pack.batches("train", batch, augment=True, seed=0):
                count += len(b.ids)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == n
    assert peak < 6 * batch_bytes, (peak, batch_bytes)
    assert peak < pack_bytes / 4  # a pack much larger than one batch is never read whole


def test_missing_truncated_and_invalid_packs(tmp_path, small_pack):
    path, _ = small_pack
    with pytest.raises(DataError, match=r"nowhere\.h5: pack not found"):
        DistrictPack(tmp_path / "nowhere.h5")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        truncated = tmp_path / f"cut{cut}.h5"
        truncated.write_bytes(data[:cut])
        with pytest.raises(DataError, match=rf"cut{cut}\.h5: not a readable HDF5 pack \(truncated or corrupt"):
            DistrictPack(truncated)
    with DistrictPack(path) as pack:
        with pytest.raises(DataError, match="unknown split 'training'"):
            pack.num_samples("training")
        with pytest.raises(DataError, match="index out of range"):
            pack.read("val", [3])


def test_list_packs_in_study_order(tmp_path):
    for name in ("zeta", "Jung-gu", "alpha", "Gangnam-gu", "Mapo-gu"):
        (tmp_path / f"{name}.h5").write_bytes(b"")
    (tmp_path / ".Jung-gu.h5.abc.h5.tmp").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.stem for p in list_packs(tmp_path)] == ["Gangnam-gu", "Mapo-gu", "Jung-gu", "alpha", "zeta"]
    with pytest.raises(DataError, match="pack folder not found"):
        list_packs(tmp_path / "missing")


def test_the_writer_writes_format_version_1_as_the_reader_expects_it(small_pack):
    """Pins version 1 of the pack layout: a change to nfed.data.packformat that fails here needs a new
    FORMAT_VERSION (and the reader keeping the old one in SUPPORTED_FORMAT_VERSIONS)."""
    path, (past, current, mask, ids) = small_pack
    assert packformat.FORMAT_VERSION == 1 and 1 in packformat.SUPPORTED_FORMAT_VERSIONS
    with h5py.File(path, "r") as file:
        assert file.attrs["format_version"] == 1 and file.attrs["tile_size"] == 16
        assert list(file.attrs["num_samples"]) == [20, 3, 0]
        assert sorted(file) == ["test", "train", "val"]
        for split in ("train", "val", "test"):
            group = file[split]
            assert sorted(group) == ["current", "ids", "mask", "past"]
            for name, row in (("past", (16, 16, 3)), ("current", (16, 16, 3)), ("mask", (16, 16))):
                assert group[name].dtype == np.uint8 and group[name].shape[1:] == row
                assert group[name].chunks == (1,) + row and group[name].compression == "gzip"
            assert h5py.check_string_dtype(group["ids"].dtype).encoding == "utf-8"
        np.testing.assert_array_equal(file["train/mask"][:], mask)
        assert [s.decode() for s in file["train/ids"][:]] == ids


def test_packs_of_an_unknown_format_version_are_refused(small_pack):
    path, _ = small_pack
    with h5py.File(path, "r+") as file:
        file.attrs["format_version"] = packformat.FORMAT_VERSION + 1
    with pytest.raises(DataError, match=r"pack format version 2 is not supported \(this nfed reads 1\)"):
        DistrictPack(path)
