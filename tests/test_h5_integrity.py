"""Issue 25, items 3 and 10: packs and checkpoints are self-contained HDF5 files that store what they declare.

Crafted files that read another file's bytes (external links, external storage, virtual datasets), link inside
themselves (soft links), or declare far more than they store are refused in one line, by `nfed info`,
`train-local`, `evaluate` and `export` alike, and nothing of the other file is ever written out.
"""
from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_hardening import TINY, invoke, one_line_error
from test_training import synthetic_pack

from nfed.common.errors import CheckpointError, DataError
from nfed.common.h5check import check_h5_file
from nfed.data.packwriter import write_pack
from nfed.model.checkpoint import load_checkpoint, save_checkpoint
from nfed.model.wnet import WNetCD

LAYER = "encoder.e1.conv1.weight"
SECRET = 1234.5   # what the "other file" holds: it must never reach an export


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A good pack, a second pack (the 'other file' of pack links) and a good checkpoint of a tiny model."""
    folder = tmp_path_factory.mktemp("good")
    synthetic_pack(folder / "Jung-gu.h5", "Jung-gu", counts=(2, 1, 1), tile=32)
    synthetic_pack(folder / "other.h5", "Nowon-gu", counts=(2, 1, 1), tile=32, seed=1)
    model = WNetCD(width=2, classes=2, lambda_rec=0.1, rng=np.random.default_rng(0))
    save_checkpoint(folder / "best.h5", model.state_dict(),
                    config={"width": 2, "classes": 2, "lambda_rec": 0.1, "tile": 32})
    return folder


def _secret_weights(files: Path, folder: Path) -> tuple[np.ndarray, Path, Path]:
    """The layer's shape filled with SECRET, as an HDF5 file (/w) and as raw bytes (a 'system file')."""
    shape = load_checkpoint(files / "best.h5").model_state[LAYER].shape
    secret = np.full(shape, SECRET, "<f4")
    with h5py.File(folder / "secret.h5", "w") as f:
        f["w"] = secret
    (folder / "secret.bin").write_bytes(secret.tobytes())
    return secret, folder / "secret.h5", folder / "secret.bin"


def _replace(f: h5py.File, name: str, kind: str, other: Path, raw: Path, like: np.ndarray) -> None:
    """Put a link, external storage or a virtual dataset of `kind` where dataset `name` was."""
    del f[name]
    if kind == "external link":
        f[name] = h5py.ExternalLink(str(other), name if other.name != "secret.h5" else "/w")
    elif kind == "soft link":
        f["stash"] = like
        f[name] = h5py.SoftLink("/stash")
    elif kind == "external storage":
        f.create_dataset(name, shape=like.shape, dtype=like.dtype, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
    else:
        layout = h5py.VirtualLayout(shape=like.shape, dtype=like.dtype)
        layout[...] = h5py.VirtualSource(str(other), name if other.name != "secret.h5" else "w", shape=like.shape)
        f.create_virtual_dataset(name, layout)


KINDS = ["external link", "soft link", "external storage", "virtual dataset"]


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_pointing_elsewhere_are_refused_and_never_exported(files, tmp_path, kind):
    secret, other, raw = _secret_weights(files, tmp_path)
    crafted = tmp_path / "crafted.h5"
    shutil.copyfile(files / "best.h5", crafted)
    with h5py.File(crafted, "r+") as f:
        _replace(f, f"model/{LAYER}", kind, other, raw, secret)

    with pytest.raises(CheckpointError, match=f"crafted.h5: .*{LAYER}.*{kind}"):
        load_checkpoint(crafted)
    one_line_error(invoke("export", "--model", crafted, "--onnx"), str(crafted), LAYER, kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.h5", "secret.bin", "secret.h5"]
    one_line_error(invoke("evaluate", "--model", crafted, "--data", files / "Jung-gu.h5"), str(crafted), kind)


@pytest.mark.parametrize("kind", KINDS)
def test_packs_pointing_elsewhere_are_refused(files, tmp_path, kind):
    crafted = tmp_path / "Jung-gu.h5"
    shutil.copyfile(files / "Jung-gu.h5", crafted)
    with h5py.File(files / "other.h5", "r") as f:
        past = f["train/past"][()]
    raw = tmp_path / "pixels.bin"
    raw.write_bytes(past.tobytes())
    with h5py.File(crafted, "r+") as f:
        _replace(f, "train/past", kind, files / "other.h5", raw, past)

    with pytest.raises(DataError, match=f"Jung-gu.h5: .*'train/past'.*{kind}"):
        from nfed.data.reader import DistrictPack
        DistrictPack(crafted)
    one_line_error(invoke("info", crafted), str(crafted), "train/past", kind)
    one_line_error(invoke("train-local", "--data", crafted, "--out", tmp_path / "run", *TINY), str(crafted), kind)
    assert not (tmp_path / "run").exists()


def test_a_pack_declaring_a_million_unstored_tiles_is_refused_at_once(files, tmp_path):
    from nfed.data.reader import DistrictPack

    crafted = tmp_path / "Jung-gu.h5"
    shutil.copyfile(files / "Jung-gu.h5", crafted)
    with h5py.File(crafted, "r+") as f:
        for name in ("past", "current", "mask", "ids"):
            f["train"][name].resize(10**6, axis=0)
    assert os.path.getsize(crafted) < 100_000
    with pytest.raises(DataError, match=r"Jung-gu.h5: dataset 'train/current' declares 1000000 tiles but stores 2 "
                                        r"\(the file is damaged or crafted\)"):
        DistrictPack(crafted)
    one_line_error(invoke("info", crafted), str(crafted), "declares 1000000 tiles but stores 2")
    one_line_error(invoke("train-local", "--data", crafted, "--out", tmp_path / "run", *TINY), "1000000 tiles")
    one_line_error(invoke("evaluate", "--model", files / "best.h5", "--data", crafted), "1000000 tiles")


def test_checkpoints_declaring_more_than_they_store_are_refused(files, tmp_path):
    # a chunk that claims 48 MB but holds a 40-byte deflate stream (beyond gzip's ~1032:1)
    bomb = tmp_path / "bomb.h5"
    shutil.copyfile(files / "best.h5", bomb)
    with h5py.File(bomb, "r+") as f:
        dataset = f.create_dataset("extra/bomb", shape=(4096, 4096, 3), dtype="u1", chunks=(4096, 4096, 3),
                                   compression="gzip")
        dataset.id.write_direct_chunk((0, 0, 0), zlib.compress(bytes(4096)))
    with pytest.raises(CheckpointError, match=r"bomb.h5: dataset 'extra/bomb' declares shape \(4096, 4096, 3\) "
                                              r"\(50331648 bytes\) but stores only \d+ bytes, beyond what its filters"):
        load_checkpoint(bomb)

    # a contiguous dataset never written: nothing stored, fill values on reading
    hollow = tmp_path / "hollow.h5"
    shutil.copyfile(files / "best.h5", hollow)
    with h5py.File(hollow, "r+") as f:
        f.create_dataset("extra/hollow", shape=(10**8,), dtype="f4")
    one_line_error(invoke("export", "--model", hollow), "extra/hollow", "(400000000 bytes) but stores none")
    assert not hollow.with_suffix(".safetensors").exists()

    # many names for one dataset: more bytes claimed than the file has
    echo = tmp_path / "echo.h5"
    shutil.copyfile(files / "best.h5", echo)
    with h5py.File(echo, "r+") as f:
        f["extra/x0"] = np.ones(2**16, np.uint8)
        for i in range(1, 64):
            f[f"extra/x{i}"] = f["extra/x0"]
    with pytest.raises(CheckpointError, match=r"echo.h5: its datasets claim \d+ bytes of storage but the file has"):
        load_checkpoint(echo)


def test_good_files_pass_including_empty_splits_and_other_standard_filters(files, tmp_path):
    with h5py.File(files / "Jung-gu.h5", "r") as f:
        train = tuple(f["train"][name][()] for name in ("past", "current", "mask")) + (["a", "b"],)
    empty = write_pack(tmp_path / "Nowon-gu.h5", "Nowon-gu", {"train": train})   # val and test: no tiles
    for path in (files / "Jung-gu.h5", files / "best.h5", empty):
        with h5py.File(path, "r") as f:
            check_h5_file(f, path)
    assert invoke("info", empty).exit_code == 0

    other = tmp_path / "filters.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("lzf", data=np.zeros((64, 64), np.uint8), chunks=(8, 64), compression="lzf", shuffle=True,
                         fletcher32=True)
        f.create_dataset("scaled", data=np.zeros((64, 64), np.float32), chunks=(8, 64), scaleoffset=3)
    with h5py.File(other, "r") as f, pytest.raises(DataError, match=r"'scaled' uses HDF5 filter 6 .*only gzip"):
        check_h5_file(f, other)
