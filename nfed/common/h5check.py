"""HDF5 files nfed reads are self-contained and store what they declare, or are refused in one line.

HDF5 can make a file read bytes from elsewhere: soft and external links, external raw storage and virtual
datasets. A crafted checkpoint or pack could so pass off another file's bytes (e.g. a system file) as weights or
pixels, which `nfed export` would then copy out. A dataset can also declare far more data than the file stores
(chunks never written read back as fill values): a 44 KB pack declaring a million tiles keeps `nfed info`
busy for hours. `check_h5_file` walks every link without following any and compares each dataset's declared
size with its stored bytes, from metadata only (no data is read), right after a reader opens a file.
"""
from __future__ import annotations

import math
import os

import h5py

from nfed.common.errors import DataError

# The filters a file may use, each with the most it can shrink data (deflate tops out near 1032:1, LZF near
# 88:1; shuffle and fletcher32 do not shrink). nfed writes gzip only; others are refused.
_FILTER_RATIOS = {h5py.h5z.FILTER_DEFLATE: 1100, h5py.h5z.FILTER_LZF: 100,
                  h5py.h5z.FILTER_SHUFFLE: 1, h5py.h5z.FILTER_FLETCHER32: 1}
_SHOWN = 80
_DAMAGED = "(the file is damaged or crafted)"


def check_h5_file(h5: h5py.File, path: str | os.PathLike, *, error: type[Exception] = DataError,
                  rows: str = "rows") -> None:
    """Raise `error` naming `path` and the object when `h5` links elsewhere or declares more than it stores.

    Refused: soft, external and user-defined links (hard links are the normal kind), datasets with external
    storage or virtual layout, filters other than gzip/lzf/shuffle/fletcher32, chunked datasets missing chunks,
    datasets whose stored bytes cannot hold their declared size, and datasets together claiming more bytes
    than the file has. `rows` names what one row of a one-row-per-chunk dataset is (e.g. "tiles").
    """
    links: list[tuple[str, int]] = []
    h5.id.links.visit(lambda name, info: links.append((name.decode("utf-8", "replace"), info.type)), info=True)
    stored = 0
    for name, kind in links:
        if kind != h5py.h5l.TYPE_HARD:
            raise error(f"{path}: {_link_problem(h5, name, kind)}; nfed reads only self-contained HDF5 files "
                        f"without links")
        obj = h5[name]
        if isinstance(obj, h5py.Dataset):
            stored += _dataset_storage(obj, f"{path}: dataset {_shown(name)}", error, rows)
    size = os.path.getsize(path)
    if stored > size:
        raise error(f"{path}: its datasets claim {stored} bytes of storage but the file has {size} {_DAMAGED}")


def _link_problem(h5: h5py.File, name: str, kind: int) -> str:
    """What a non-hard link is and where it points, in words."""
    link = h5.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        return f"{_shown(name)} is an external link to {_shown(link.filename)}:{_shown(link.path)}"
    if isinstance(link, h5py.SoftLink):
        return f"{_shown(name)} is a soft link to {_shown(link.path)}"
    return f"{_shown(name)} is a link of user-defined type {kind}"


def _dataset_storage(dataset: h5py.Dataset, label: str, error: type[Exception], rows: str) -> int:
    """The bytes `dataset` stores in the file, after checking they are its own and can hold its declared size."""
    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise error(f"{label} is a virtual dataset (its data lives in other files); nfed reads only "
                    f"self-contained HDF5 files")
    if plist.get_external_count() > 0:
        other = plist.get_external(0)[0].decode("utf-8", "replace")
        raise error(f"{label} keeps its data in another file ({_shown(other)}, external storage); nfed reads "
                    f"only self-contained HDF5 files")
    ratio = 1
    for index in range(plist.get_nfilters()):
        code, _, _, filter_name = plist.get_filter(index)
        if code not in _FILTER_RATIOS:
            raise error(f"{label} uses HDF5 filter {code} ({_shown(filter_name.decode('utf-8', 'replace'))}); "
                        f"nfed reads only gzip, lzf, shuffle and fletcher32")
        ratio *= _FILTER_RATIOS[code]
    storage = dataset.id.get_storage_size()
    shape = dataset.shape or ()
    count = math.prod(shape)
    if count == 0:
        return storage
    if dataset.chunks is not None:
        needed = math.prod(-(-extent // chunk) for extent, chunk in zip(shape, dataset.chunks))
        allocated = dataset.id.get_num_chunks()
        if allocated < needed:
            if dataset.chunks[0] == 1 and tuple(dataset.chunks[1:]) == tuple(shape[1:]):
                raise error(f"{label} declares {shape[0]} {rows} but stores {allocated} {_DAMAGED}")
            raise error(f"{label} declares shape {shape} in {needed} chunks but stores {allocated} {_DAMAGED}")
    declared = count * dataset.id.get_type().get_size()
    if storage * ratio < declared:
        held = "none" if storage == 0 else f"only {storage} bytes" + (", beyond what its filters compress"
                                                                          if ratio > 1 else "")
        raise error(f"{label} declares shape {shape} ({declared} bytes) but stores {held} {_DAMAGED}")
    return storage


def _shown(text: str) -> str:
    """A name read from the file, quoted, escaped and cut short: it is data, printed on one line."""
    return ascii(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")
