"""nfed's weights serialisation (issue 26, item 1): the packed Array is the bytes np.save writes, decoded without
Flower's np.load copy (read-only views on request), malformed .npy bytes refused; `nfed bench transfer` on loopback."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("flwr")


def _weights():
    return {"a": np.arange(6, dtype=">f4").reshape(2, 3), "b": np.ones((3, 2), np.float16).T,
            "flag": np.array(True), "empty": np.zeros(0, np.float32), "step": np.asarray(4, np.int64)}


def test_packed_arrays_are_np_save_bytes_and_views_need_no_copy():
    from nfed.federation.flower.messages import record_to_weights, weights_to_record

    weights = _weights()
    record = weights_to_record(weights)
    for key, array in record.items():
        if key.startswith("packed."):
            buffer = io.BytesIO()
            np.save(buffer, array.numpy(), allow_pickle=False)
            assert buffer.getvalue() == array.data, key
    for copy in (True, False):
        back = record_to_weights(record, copy=copy)
        for name, value in weights.items():
            assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
            assert back[name].flags.writeable == copy
    view = record_to_weights(record, copy=False)["a"]
    assert np.shares_memory(view, np.frombuffer(record["packed.>f4"].data, np.uint8))


@pytest.mark.parametrize("spoil", ["truncated", "object", "fortran", "2d", "magic"])
def test_malformed_packed_bytes_are_refused(spoil):
    from flwr.app import Array

    from nfed.common.errors import DataError
    from nfed.federation.flower.messages import record_to_weights, weights_to_record

    record = weights_to_record({"w": np.arange(8, dtype=np.float32)})
    good = record["packed.<f4"]
    if spoil == "truncated":
        data = good.data[:-4]
    elif spoil == "magic":
        data = b"NOTNUMPY" + good.data[8:]
    else:
        buffer = io.BytesIO()
        value = {"object": np.array([1, None], dtype=object), "fortran": np.asfortranarray(np.ones((2, 4), "<f4")),
                 "2d": np.ones((2, 4), "<f4")}[spoil]
        np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(value))
        data = buffer.getvalue() + b"\0" * 32
    record["packed.<f4"] = Array(dtype="float32", shape=(8,), stype="numpy.ndarray", data=data)
    with pytest.raises(DataError, match="unreadable weights record"):
        record_to_weights(record)


def test_nfed_bench_transfer_times_serialisation_and_a_plain_http_copy(tmp_path):
    """The command's JSON: both packings' MB/s and the loopback HTTP round trip of the same bytes (127.0.0.1 only)."""
    from nfed.cli import cli

    out = tmp_path / "transfer.json"
    result = CliRunner().invoke(cli, ["bench", "transfer", "--width", "4", "--repeat", "1", "--json",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown == json.loads(out.read_text())
    assert shown["width"] == 4 and shown["megabytes"] > 0 and shown["chunks_each_way"] >= 1
    for key in ("encode_mb_per_s", "decode_mb_per_s", "decode_views_mb_per_s", "old_encode_mb_per_s",
                "old_decode_mb_per_s", "http_mb_per_s_both_ways"):
        assert shown[key] > 0, key
    assert len(shown["load_average"]) == 3
