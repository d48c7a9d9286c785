"""conv2d / conv_transpose2d and the shared im2col helpers: oracles, gradient checks, dtypes, devices."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DEVICES
from scipy import signal

from nfed.common import backend
from nfed.core import functions as F
from nfed.core.autograd import Tensor
from nfed.core.functions import conv as conv_module
from nfed.core.functions.im2col import col2im, flat_cols, im2col, padded_rows
from nfed.core.gradcheck import check_gradients

# (kernel, stride, padding): the W-Net's 3x3/pad 1 and 1x1 first, then general cases.
CONV_CASES = [(3, 1, 1), (1, 1, 0), (3, 2, 1), (2, 2, 0), (5, 1, 2), (3, 1, 0), ((3, 2), (2, 1), (1, 0))]
DECONV_CASES = [(2, 2, 0), (3, 2, 1), (3, 1, 1), (4, 2, 1), (1, 1, 0)]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def conv2d_oracle(x, w, b, stride, padding):
    """Cross-correlation per (sample, output channel) with scipy.signal.correlate."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = []
    for n in range(x.shape[0]):
        rows = [signal.correlate(xpad[n], w[o], mode="valid")[0, ::sh, ::sw] + (0 if b is None else b[o])
                for o in range(w.shape[0])]
        out.append(rows)
    return np.array(out)


def conv_transpose2d_oracle(x, w, b, stride, padding):
    """Scatter every input pixel times the kernel into the output (naive loops)."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    full = np.zeros((n, cout, (h - 1) * sh + kh, (wd - 1) * sw + kw))
    for i in range(h):
        for j in range(wd):
            # [N, Cin] x [Cin, Cout, kh, kw] -> [N, Cout, kh, kw]
            full[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += np.einsum("nc,cokl->nokl", x[:, :, i, j], w)
    out = full[:, :, ph:full.shape[2] - ph, pw:full.shape[3] - pw]
    return out + (0 if b is None else b[None, :, None, None])


def im2col_oracle(x, kh, kw, sh, sw, ph, pw):
    n, c, h, wd = x.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    cols = np.zeros((n, c * kh * kw, ho * wo))
    for s in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    for y in range(ho):
                        for z in range(wo):
                            cols[s, (ch * kh + i) * kw + j, y * wo + z] = xpad[s, ch, y * sh + i, z * sw + j]
    return cols


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (2, 2, 0), (3, 2, 1), ((2, 3), (1, 2), (0, 1))])
def test_im2col_matches_loops_and_col2im_is_its_adjoint(kernel, stride, padding):
    rng = np.random.default_rng(0)
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    x = rng.standard_normal((2, 3, 6, 5))
    cols = im2col(x, kh, kw, sh, sw, ph, pw)
    np.testing.assert_array_equal(cols, im2col_oracle(x, kh, kw, sh, sw, ph, pw))
    c = rng.standard_normal(cols.shape)
    back = col2im(c, x.shape, kh, kw, sh, sw, ph, pw)
    np.testing.assert_allclose((cols * c).sum(), (x * back).sum(), rtol=1e-12)


@pytest.mark.parametrize("kernel,padding", [(3, 1), (3, 0), (5, 2), ((1, 3), (0, 1))])
def test_flat_cols_equal_im2col_on_valid_columns(kernel, padding):
    rng = np.random.default_rng(1)
    (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
    x = rng.standard_normal((2, 3, 5, 6))
    ho, wo = 5 + 2 * ph - kh + 1, 6 + 2 * pw - kw + 1
    wp = 6 + 2 * pw
    expected = im2col_oracle(x, kh, kw, 1, 1, ph, pw)
    for n in range(2):
        whole = padded_rows(x[n], 0, ho + kh - 1, ph, pw, kw - 1)
        cols = flat_cols(whole, kh, kw, wp, 0, ho * wp)
        valid = cols.reshape(-1, ho, wp)[..., :wo].reshape(-1, ho * wo)
        np.testing.assert_array_equal(valid, expected[n])
        # blocks of output rows (each from its own padded slab) are the matching slices of the whole
        for first, count in [(0, 1), (1, ho - 1), (ho - 1, 1)]:
            slab = padded_rows(x[n], first, count + kh - 1, ph, pw, kw - 1)
            block = flat_cols(slab, kh, kw, wp, 0, count * wp).reshape(-1, count, wp)[..., :wo]
            np.testing.assert_array_equal(block, cols.reshape(-1, ho, wp)[:, first:first + count, :wo])
    with pytest.raises(ValueError, match="past the padded planes"):
        flat_cols(whole, kh, kw, wp, wp, ho * wp)


# op, its oracle, (kernel, stride, padding) and the weight shape for 3 input channels.
OP_CASES = ([("conv2d", conv2d_oracle, case, (4, 3)) for case in CONV_CASES]
            + [("conv_transpose2d", conv_transpose2d_oracle, case, (3, 2)) for case in DECONV_CASES])
OP_IDS = [f"{op}-{case}" for op, _, case, _ in OP_CASES]


def _weight(rng, channels, kernel):
    return rng.standard_normal(channels + _pair(kernel))


@pytest.fixture(params=["kernels", "generic"])
def cpu_path(request, monkeypatch):
    """NumPy convolutions through conv_cpu's channels-last kernels (forced here for the NCHW test inputs too),
    or through the array-agnostic code that serves NCHW and CuPy arrays (forced: no kernel family applies)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cuda" and request.param == "generic":
        pytest.skip("the GPU runs its own kernels: one run is enough")
    if request.param == "generic":
        monkeypatch.setattr(conv_module, "_cpu_family", lambda *args: None)
    else:
        monkeypatch.setattr(conv_module, "_channels_last_data", lambda a: True)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,oracle,case,channels", OP_CASES, ids=OP_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_oracle(device, op, oracle, case, channels, bias, cpu_path):
    """conv2d against scipy.signal.correlate, conv_transpose2d against naive scatter loops."""
    xp = backend.parse_device(device).xp
    kernel, stride, padding = case
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 8))
    w = _weight(rng, channels, kernel)
    b = rng.standard_normal(w.shape[1] if op == "conv_transpose2d" else w.shape[0]) if bias else None
    out = getattr(F, op)(xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b), stride, padding)
    np.testing.assert_allclose(backend.to_numpy(out.data), oracle(x, w, b, stride, padding), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,oracle,case,channels", OP_CASES, ids=OP_IDS)
def test_gradcheck(device, op, oracle, case, channels, cpu_path):
    xp = backend.parse_device(device).xp
    kernel, stride, padding = case
    rng = np.random.default_rng(3)
    x = xp.asarray(rng.standard_normal((2, 3, 7, 6)))
    w = xp.asarray(_weight(rng, channels, kernel))
    b = xp.asarray(rng.standard_normal(w.shape[1] if op == "conv_transpose2d" else w.shape[0]))
    fn = getattr(F, op)
    check_gradients(lambda a, k, c: fn(a, k, c, stride, padding), [x, w, b])


def test_conv2d_gradcheck_large_random_direction():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8, 12, 12))
    w = rng.standard_normal((6, 8, 3, 3)) * 0.2
    b = rng.standard_normal(6)
    check_gradients(lambda a, k, c: F.conv2d(a, k, c, 1, 1), [x, w, b], directions=4)


@pytest.mark.parametrize("op", ["conv", "deconv"])
def test_float32_matches_float64(op):
    rng = np.random.default_rng(7)
    if op == "conv":
        x, w, b = rng.standard_normal((2, 8, 16, 16)), rng.standard_normal((4, 8, 3, 3)), rng.standard_normal(4)
        fn = lambda *a: F.conv2d(*a, stride=1, padding=1)  # noqa: E731
    else:
        x, w, b = rng.standard_normal((2, 8, 8, 8)), rng.standard_normal((8, 4, 2, 2)), rng.standard_normal(4)
        fn = F.conv_transpose2d
    grads = {}
    for dtype in (np.float32, np.float64):
        ts = [Tensor(a.astype(dtype), requires_grad=True) for a in (x, w, b)]
        out = fn(*ts)
        assert out.dtype == dtype
        (out * out).sum().backward()
        assert all(t.grad.dtype == dtype for t in ts)
        grads[dtype] = [out.data] + [t.grad for t in ts]
    for lo, hi in zip(grads[np.float32], grads[np.float64]):
        np.testing.assert_allclose(lo, hi, rtol=2e-4, atol=2e-3 * np.abs(hi).max())


def test_blocked_patch_matrix_gives_the_same_result(monkeypatch, cpu_path):
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((5, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    g = rng.standard_normal((5, 4, 6, 6))
    whole = (conv_module.conv2d_forward(x, w, None, 1, 1), conv_module.conv2d_backward_weight(x, g, w.shape, 1, 1))
    monkeypatch.setattr(conv_module, "CPU_BLOCK_BYTES", 1)  # one output row per block
    monkeypatch.setattr(conv_module.conv_cpu, "PATCH_BLOCK_BYTES", 1)
    chunked = (conv_module.conv2d_forward(x, w, None, 1, 1), conv_module.conv2d_backward_weight(x, g, w.shape, 1, 1))
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="channels"):
        F.conv2d(np.zeros((1, 3, 4, 4)), np.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="channels"):
        F.conv_transpose2d(np.zeros((1, 3, 4, 4)), np.zeros((2, 4, 2, 2)))


def test_input_gradient_skipped_when_not_needed():
    rng = np.random.default_rng(9)
    x = Tensor(rng.standard_normal((1, 2, 4, 4)))  # image: no grad
    w = Tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    out = F.conv2d(x, w, None, 1, 1)
    assert out._creator.w is None  # the weight is not kept when the input needs no gradient
    out.sum().backward()
    assert x.grad is None and w.grad.shape == (3, 2, 3, 3)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_conv2d_against_torch(kernel, stride, padding):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    x, w, b = rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((3, 4, kernel, kernel)), rng.standard_normal(3)
    ts = [Tensor(a, requires_grad=True) for a in (x, w, b)]
    g = rng.standard_normal(F.conv2d(x, w, b, stride, padding).shape)
    F.conv2d(*ts, stride=stride, padding=padding).backward(g)
    tt = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    torch.nn.functional.conv2d(*tt, stride=stride, padding=padding).backward(torch.tensor(g))
    for mine, ref in zip(ts, tt):
        np.testing.assert_allclose(mine.grad, ref.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_conv_transpose2d_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(3)
    ts = [Tensor(a, requires_grad=True) for a in (x, w, b)]
    out = F.conv_transpose2d(*ts)
    g = rng.standard_normal(out.shape)
    out.backward(g)
    tt = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    ref = torch.nn.functional.conv_transpose2d(*tt, stride=2)
    ref.backward(torch.tensor(g))
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-10, atol=1e-10)
    for mine, r in zip(ts, tt):
        np.testing.assert_allclose(mine.grad, r.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (1, 1, 0), (3, 2, 1), (2, 2, 0)])
def test_parallel_blocks_match_serial(monkeypatch, kernel, stride, padding, cpu_path):
    """The worker-pool path (forced on small inputs, many one-row blocks) equals the serial path."""
    rng = np.random.default_rng(12)
    x, w, b = rng.standard_normal((3, 4, 8, 8)), rng.standard_normal((5, 4, kernel, kernel)), rng.standard_normal(5)
    g = rng.standard_normal(conv_module.conv2d_forward(x, w, b, stride, padding).shape)
    wt = rng.standard_normal((5, 4, kernel, kernel))

    def everything():
        y = conv_module.conv2d_forward(x, w, b, stride, padding)
        return (y, conv_module.conv2d_backward_input(g, w, x.shape, stride, padding),
                conv_module.conv2d_backward_weight(x, g, w.shape, stride, padding),
                conv_module.conv_transpose2d_forward(g, wt, b[:4], stride, padding))

    serial = everything()
    monkeypatch.setattr(conv_module, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(conv_module, "CPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(conv_module.conv_cpu, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(conv_module.conv_cpu, "PATCH_BLOCK_BYTES", 1)
    monkeypatch.setenv("NFED_NUM_THREADS", "3")
    for a, c in zip(serial, everything()):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)
