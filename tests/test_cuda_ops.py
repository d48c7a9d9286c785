"""GPU ops (nfed.gpu.*) against nfed's CPU functions, the ops' dispatch of CuPy arrays to them, and a full
W-Net-CD step GPU vs CPU.

Every test here is marked `gpu` (skipped without CuPy and a CUDA device); collection never needs CuPy.
Errors are compared as max |gpu - cpu| / max |cpu| (normalised) with the float32 bound of
nfed.gpu.precision.TOLERANCES; float64 cases use 1e-10.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from nfed.common import backend
from nfed.gpu import batchnorm as gpu_batchnorm
from nfed.gpu import conv as gpu_conv
from nfed.gpu import fedavg as gpu_fedavg
from nfed.gpu import gemm, kernels
from nfed.gpu import pooling as gpu_pooling
from nfed.gpu import precision
from nfed.gpu import softmax as gpu_softmax

pytestmark = pytest.mark.gpu

FP32 = precision.TOLERANCES["fp32"]


def cp():
    return backend.cupy_module()


def gpu(a):
    return backend.to_device(np.ascontiguousarray(a), "cuda")


def host(a):
    return backend.to_numpy(a)


def assert_close(actual, expected, tol=FP32):
    actual, expected = host(actual).astype(np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-12)
    error = float(np.max(np.abs(actual - expected))) / scale if expected.size else 0.0
    assert error <= tol, f"normalised error {error:.3g} > {tol:.3g}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# --- GEMM and precision modes ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", precision.MODES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_matches_numpy_in_every_mode(rng, mode, trans_a, trans_b):
    a = randn(rng, 3, 37, 53) if not trans_a else randn(rng, 3, 53, 37)
    b = randn(rng, 53, 29) if not trans_b else randn(rng, 29, 53)
    expected = np.matmul(a.swapaxes(-1, -2) if trans_a else a, b.T if trans_b else b)
    out = gemm.gemm(gpu(a), gpu(b), trans_a=trans_a, trans_b=trans_b, mode=mode)
    assert out.dtype == np.float32
    assert_close(out, expected, precision.TOLERANCES[mode])


def test_gemm_batched_both_sides_accumulates_with_beta_and_float64(rng):
    a, b = randn(rng, 4, 8, 16, dtype=np.float64), randn(rng, 4, 16, 5, dtype=np.float64)
    c = randn(rng, 4, 8, 5, dtype=np.float64)
    out = gpu(c)
    gemm.gemm(gpu(a), gpu(b), out=out, alpha=2.0, beta=1.0)
    assert_close(out, 2.0 * np.matmul(a, b) + c, 1e-12)


def test_bf16_packing_rounds_to_nearest_even(rng):
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.4e38, np.inf, 0.0], dtype=np.float32)
    bits = gemm.float_to_bf16(gpu(x))
    back = host(gemm.bf16_to_float(bits))
    # 1 + 2^-8 is a tie -> even (1.0); 1 + 3*2^-8 is a tie -> even (1 + 2^-6)
    assert back.tolist()[:4] == [1.0, 1.0, 1.015625, -2.5]
    assert np.isinf(back[5]) and back[6] == 0.0
    nan = host(gemm.bf16_to_float(gemm.float_to_bf16(gpu(np.array([np.nan], np.float32)))))
    assert np.isnan(nan[0])


# --- im2col / col2im -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (2, 2, 0), (1, 1, 0), (5, 1, 2)])
def test_im2col_matches_cpu_and_col2im_is_its_adjoint(rng, k, s, p):
    from nfed.core.functions.im2col import im2col as cpu_im2col

    x = randn(rng, 2, 3, 9, 11)
    col = gpu_conv.im2col(gpu(x), k, s, p)
    assert_close(col, cpu_im2col(x, k, k, s, s, p, p), 0.0)
    c = randn(rng, *col.shape)
    back = gpu_conv.col2im(gpu(c), x.shape, k, s, p)
    # <im2col(x), c> == <x, col2im(c)>
    assert np.isclose(float(np.sum(host(col).astype(np.float64) * c)), float(np.sum(x.astype(np.float64) * host(back))),
                      rtol=1e-4)


# --- convolution -------------------------------------------------------------------------------------------

CONV_CASES = [  # (N, C, H, W, O, k, stride, padding)
    (2, 3, 16, 16, 8, 3, 1, 1),
    (2, 2, 9, 12, 20, 3, 1, 1),  # 20 output channels: one full and one partial block of the direct kernel
    (3, 8, 9, 7, 5, 3, 1, 1),
    (2, 6, 10, 10, 4, 1, 1, 0),
    (2, 4, 11, 9, 6, 3, 2, 1),
    (2, 4, 8, 8, 3, 2, 2, 0),
]


# every forward algorithm: auto (direct for C*k*k <= 32, Winograd for 3x3 stride 1), Winograd instead of
# direct, and im2col + GEMM everywhere
ALGORITHMS = {"auto": ("auto", "32"), "no-direct": ("auto", "0"), "im2col": ("im2col", "32")}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_and_backward_match_cpu(rng, monkeypatch, case, dtype, algorithm):
    from nfed.core.functions import conv

    monkeypatch.setenv("NFED_CONV_ALGORITHM", ALGORITHMS[algorithm][0])
    monkeypatch.setenv("NFED_CONV_DIRECT_MAX_K", ALGORITHMS[algorithm][1])
    monkeypatch.setenv("NFED_IM2COL_BUDGET_MB", "0.001")  # force one sample per chunk: the chunk loop runs
    n, c, h, w, o, k, s, p = case
    x, wt, b = randn(rng, n, c, h, w, dtype=dtype), randn(rng, o, c, k, k, dtype=dtype), randn(rng, o, dtype=dtype)
    tol = FP32 if dtype == np.float32 else 1e-10
    y = gpu_conv.conv2d_forward(gpu(x), gpu(wt), gpu(b), s, p)
    assert_close(y, conv.conv2d_forward(x, wt, b, s, p), tol)
    gy = randn(rng, *y.shape, dtype=dtype)
    assert_close(gpu_conv.conv2d_backward_input(gpu(gy), gpu(wt), x.shape, s, p),
                 conv.conv2d_backward_input(gy, wt, x.shape, s, p), tol)
    assert_close(gpu_conv.conv2d_backward_weight(gpu(x), gpu(gy), wt.shape, s, p),
                 conv.conv2d_backward_weight(x, gy, wt.shape, s, p), tol)
    assert_close(gpu_conv.conv2d_backward_bias(gpu(gy)), conv.conv2d_backward_bias(gy), tol)


@pytest.mark.parametrize("case", [(2, 8, 5, 6, 4, 2, 2, 0), (2, 3, 4, 4, 5, 3, 2, 1)])
def test_conv_transpose2d_matches_cpu(rng, case):
    from nfed.core.functions import conv

    n, c_in, h, w, c_out, k, s, p = case
    x, wt, b = randn(rng, n, c_in, h, w), randn(rng, c_in, c_out, k, k), randn(rng, c_out)
    y = gpu_conv.conv_transpose2d_forward(gpu(x), gpu(wt), gpu(b), s, p)
    assert_close(y, conv.conv_transpose2d_forward(x, wt, b, s, p))
    gy = randn(rng, *y.shape)
    assert_close(gpu_conv.conv_transpose2d_backward_input(gpu(gy), gpu(wt), s, p),
                 conv.conv_transpose2d_backward_input(gy, wt, s, p))
    assert_close(gpu_conv.conv_transpose2d_backward_weight(gpu(x), gpu(gy), wt.shape, s, p),
                 conv.conv_transpose2d_backward_weight(x, gy, wt.shape, s, p))


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_reduced_precision_convolution_stays_within_its_tolerance(rng, mode):
    from nfed.core.functions import conv

    x, wt = randn(rng, 2, 16, 12, 12), randn(rng, 8, 16, 3, 3)
    gy = randn(rng, 2, 8, 12, 12)
    with precision.precision(mode):
        y = gpu_conv.conv2d_forward(gpu(x), gpu(wt), None, 1, 1)
        gx = gpu_conv.conv2d_backward_input(gpu(gy), gpu(wt), x.shape, 1, 1)
        gw = gpu_conv.conv2d_backward_weight(gpu(x), gpu(gy), wt.shape, 1, 1)
    tol = precision.TOLERANCES[mode]
    assert_close(y, conv.conv2d_forward(x, wt, None, 1, 1), tol)
    assert_close(gx, conv.conv2d_backward_input(gy, wt, x.shape, 1, 1), tol)
    assert_close(gw, conv.conv2d_backward_weight(x, gy, wt.shape, 1, 1), tol)
    assert precision.get_precision() == precision.parse_precision(None)


# --- pooling -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,s", [(2, None), (3, 2), (3, 1), (2, 3)])
def test_max_pool2d_matches_cpu_including_indices(rng, k, s, dtype):
    from nfed.core.functions import pooling

    x = randn(rng, 2, 3, 9, 8, dtype=dtype)
    x[0, 0, :2, :2] = 1.5  # a tie: the first maximum wins on both sides
    y, index = gpu_pooling.max_pool2d_forward(gpu(x), k, s)
    y_cpu, index_cpu = pooling.max_pool2d_forward(x, k, s)
    assert_close(y, y_cpu, 0.0)
    assert np.array_equal(host(index).astype(np.int64), index_cpu.astype(np.int64))
    gy = randn(rng, *y.shape, dtype=dtype)
    assert_close(gpu_pooling.max_pool2d_backward(gpu(gy), index, x.shape, k, s),
                 pooling.max_pool2d_backward(gy, index_cpu, x.shape, k, s), 1e-6)


# --- batch norm ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 5, 7, 6), (8, 3), (2, 16, 33, 1)])
def test_batch_norm_train_functions_match_cpu(rng, shape):
    from nfed.core.functions import normalization as bn

    x = randn(rng, *shape) * 3 + 50  # a large mean: the shifted one-pass variance must stay accurate
    gamma, beta = randn(rng, shape[1]), randn(rng, shape[1])
    got = gpu_batchnorm.batch_norm_train_forward(gpu(x), gpu(gamma), gpu(beta), 1e-5)
    want = bn.batch_norm_train_forward(x, gamma, beta, 1e-5)
    for g, w in zip(got, want):
        assert_close(g, w.reshape(g.shape) if w.size == g.size else w, 1e-3)
    gy = randn(rng, *shape)
    got_b = gpu_batchnorm.batch_norm_train_backward(gpu(gy), got[1], gpu(gamma), got[4])
    want_b = bn.batch_norm_train_backward(gy, want[1], gamma, want[4])
    for g, w in zip(got_b, want_b):
        assert_close(g, w, 1e-3)


def test_batch_norm_eval_and_fused_relu_match_cpu(rng):
    from nfed.core.functions import normalization as bn

    x = randn(rng, 3, 4, 6, 5)
    gamma, beta = randn(rng, 4), randn(rng, 4)
    rm, rv = randn(rng, 4), np.abs(randn(rng, 4)) + 0.5
    y = gpu_batchnorm.batch_norm_eval_forward(gpu(x), gpu(gamma), gpu(beta), gpu(rm), gpu(rv), 1e-5)
    assert_close(y, bn.batch_norm_eval_forward(x, gamma, beta, rm, rv, 1e-5))
    mean, invstd = rm, (1.0 / np.sqrt(rv + 1e-5)).astype(np.float32)
    gy = randn(rng, *x.shape)
    for g, w in zip(gpu_batchnorm.batch_norm_eval_backward(gpu(gy), gpu(x), gpu(gamma), gpu(mean), gpu(invstd)),
                    bn.batch_norm_eval_backward(gy, x, gamma, mean, invstd)):
        assert_close(g, w)

    # fused BN + ReLU (training) == CPU batch norm followed by relu, running statistics included
    rm_gpu, rv_gpu = gpu(rm), gpu(rv)
    y_fused, fmean, finvstd = gpu_batchnorm.batch_norm_forward(gpu(x), gpu(gamma), gpu(beta), rm_gpu, rv_gpu,
                                                          True, 0.1, 1e-5, relu=True)
    y_cpu, xhat, _, var, invstd_cpu = bn.batch_norm_train_forward(x, gamma, beta, 1e-5)
    rm_cpu, rv_cpu = rm.copy(), rv.copy()
    bn.update_running_stats(rm_cpu, rv_cpu, x.mean(axis=(0, 2, 3)), var, x.size // 4, 0.1)
    assert_close(y_fused, np.maximum(y_cpu, 0), 1e-3)
    assert_close(rm_gpu, rm_cpu, 1e-4)
    assert_close(rv_gpu, rv_cpu, 1e-4)
    g_relu = gy * (y_cpu > 0)
    want = bn.batch_norm_train_backward(g_relu, xhat, gamma, invstd_cpu)
    got = gpu_batchnorm.batch_norm_backward(gpu(gy), gpu(x), gpu(gamma), gpu(beta), fmean, finvstd, True, relu=True)
    for g, w in zip(got, want):
        assert_close(g, w, 1e-3)


# --- softmax, cross-entropy -------------------------------------------------------------------------------

def test_softmax_and_log_softmax_forward_backward(rng):
    x = randn(rng, 2, 5, 4, 3) * 4
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    assert_close(gpu_softmax.softmax(gpu(x)), p)
    assert_close(gpu_softmax.log_softmax(gpu(x)), np.log(p))
    gy = randn(rng, *x.shape)
    assert_close(gpu_softmax.softmax_backward(gpu(gy), gpu(p)), p * (gy - (gy * p).sum(axis=1, keepdims=True)))
    assert_close(gpu_softmax.softmax_backward(gpu(gy), gpu(np.log(p)), log=True),
                 gy - p * gy.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_cpu(rng, reduction, weighted):
    from nfed.core import functions as F
    from nfed.core.autograd import Tensor

    logits = randn(rng, 3, 4, 5, 6) * 3
    target = rng.integers(0, 4, size=(3, 5, 6))
    target[0, 0, :3] = -100
    weight = np.array([0.5, 2.0, 1.0, 3.0], np.float32) if weighted else None
    t = Tensor(logits, requires_grad=True)
    loss = F.cross_entropy(t, target, weight=weight, reduction=reduction)
    upstream = randn(rng, *loss.shape) if reduction == "none" else np.float32(1.7)
    loss.backward(upstream)
    value, denominator = gpu_softmax.cross_entropy_forward(gpu(logits), gpu(target),
                                                        None if weight is None else gpu(weight), -100, reduction)
    assert_close(value, loss.data)
    grad = gpu_softmax.cross_entropy_backward(gpu(np.asarray(upstream)), gpu(logits), gpu(target),
                                           None if weight is None else gpu(weight), -100, reduction, denominator)
    assert_close(grad, t.grad)


def test_cross_entropy_invalid_target_gives_nan_not_garbage(rng):
    logits = randn(rng, 1, 2, 2, 2)
    value, _ = gpu_softmax.cross_entropy_forward(gpu(logits), gpu(np.array([[[0, 1], [5, 1]]])))
    assert np.isnan(float(host(value)))


# --- optimisers and FedAvg --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["adam", "adamw", "adam_l2", "sgd", "sgd_nesterov"])
def test_fused_optimiser_updates_match_cpu_optimisers(rng, kind):
    from nfed.core import optim
    from nfed.core.nn import Parameter

    shapes = [(7, 3), (129,)]
    init = [randn(rng, *s) for s in shapes]
    grads = [[randn(rng, *s) for s in shapes] for _ in range(3)]

    def make(params):
        named = list(zip(["a", "b"], params))
        if kind == "adam":
            return optim.Adam(named, lr=1e-2)
        if kind == "adamw":
            return optim.AdamW(named, lr=1e-2, weight_decay=0.1)
        if kind == "adam_l2":
            return optim.Adam(named, lr=1e-2, weight_decay=0.1)
        return optim.SGD(named, lr=1e-2, momentum=0.9, weight_decay=0.01, nesterov=kind == "sgd_nesterov")

    cpu_params = [Parameter(a.copy()) for a in init]
    gpu_params = [Parameter(gpu(a)) for a in init]
    cpu_opt, gpu_opt = make(cpu_params), make(gpu_params)
    with launched() as names:
        for step_grads in grads:
            for p, g in zip(cpu_params, step_grads):
                p.grad = g.copy()
            for p, g in zip(gpu_params, step_grads):
                p.grad = gpu(g)
            cpu_opt.step()
            gpu_opt.step()
    assert set(names) == {f"{'sgd' if kind.startswith('sgd') else 'adam'}_update_f32"}  # the fused kernel alone
    for pc, pg in zip(cpu_params, gpu_params):
        assert_close(pg.data, pc.data, 1e-5)
    for key, value in cpu_opt.state_dict().items():
        assert_close(gpu_opt.state_dict()[key], value, 1e-5)


def test_weighted_accumulate_and_the_aggregator_on_device(rng):
    from nfed.federation.aggregator import FedAvgAggregator

    arrays = [randn(rng, 1001) for _ in range(5)]
    weights = rng.random(5)
    expected = sum(w * a.astype(np.float64) for w, a in zip(weights, arrays))
    acc = cp().zeros(1001, dtype=np.float64)
    for w, a in zip(weights, arrays):
        gpu_fedavg.weighted_accumulate(acc, gpu(a), float(w))
    assert_close(acc, expected, 1e-12)

    counts = [3, 1, 4, 1, 5]
    results = []
    for to in (np.asarray, gpu):
        aggregator = FedAvgAggregator({"w": to(arrays[0]), "b": to(arrays[1][:7].astype(np.float64))})
        with launched() as names:
            for a, c in zip(arrays, counts):
                aggregator.add({"w": to(a), "b": to(a[:7].astype(np.float64))}, c)
        results.append((aggregator.finish(), names))
    (cpu_avg, cpu_names), (gpu_avg, gpu_names) = results
    assert not cpu_names and set(gpu_names) == {"weighted_accumulate_f32_to_f64", "weighted_accumulate_f64"}
    for name in ("w", "b"):
        assert backend.is_gpu_array(gpu_avg[name]) and gpu_avg[name].dtype == cpu_avg[name].dtype
        assert_close(gpu_avg[name], cpu_avg[name], 1e-7)


# --- the ops' dispatch and a full W-Net-CD training step -------------------------------------------------------

@contextlib.contextmanager
def launched():
    """kernel name -> argument tuples of the launches inside the block (nfed.gpu.kernels.launch, observed)."""
    names = {}
    real = kernels.launch

    def recording(name, grid, args, *rest, **kwargs):
        names.setdefault(name, []).append(args)
        return real(name, grid, args, *rest, **kwargs)

    kernels.launch = recording
    try:
        yield names
    finally:
        kernels.launch = real


def test_ops_send_cupy_arrays_to_the_gpu_kernels_and_leave_numpy_alone(rng):
    from nfed.core import functions as F
    from nfed.core.autograd import Tensor

    x, w, b = randn(rng, 2, 3, 8, 8), randn(rng, 4, 3, 3, 3), randn(rng, 4)
    target = rng.integers(0, 4, size=(2, 4, 4))
    cpu_x = Tensor(x, requires_grad=True)
    with launched() as names:
        cpu_loss = F.cross_entropy(F.max_pool2d(F.conv2d(cpu_x, Tensor(w), Tensor(b), padding=1)), target)
        cpu_loss.backward()
    assert not names and isinstance(cpu_loss.data, np.ndarray)
    gpu_x = Tensor(gpu(x), requires_grad=True)
    with launched() as names:
        gpu_loss = F.cross_entropy(F.max_pool2d(F.conv2d(gpu_x, Tensor(gpu(w)), Tensor(gpu(b)), padding=1)),
                                   gpu(target))
        gpu_loss.backward()
    assert {"conv2d_direct_NCHW_f32", "max_pool2d_forward_NCHW_f32_u8",
            "softmax_cross_entropy_forward_NKHW_f32", "softmax_cross_entropy_backward_NKHW_f32"} <= set(names)
    assert_close(gpu_loss.data, cpu_loss.data)
    assert_close(gpu_x.grad, cpu_x.grad)


def test_unsupported_arguments_fall_back_to_the_array_agnostic_code(rng):
    from nfed.core.functions import conv

    x, w = randn(rng, 1, 2, 7, 9), randn(rng, 3, 2, 3, 3)
    with launched() as names:  # unequal strides: no GPU kernel takes them, CuPy's own operations do
        y = conv.conv2d_forward(gpu(x), gpu(w), None, (1, 2), 1)
    assert not names and backend.is_gpu_array(y)
    assert_close(y, conv.conv2d_forward(x, w, None, (1, 2), 1))


def test_full_wnet_training_step_gpu_matches_cpu():
    """Forward, backward (every gradient), BatchNorm running statistics and an SGD update, GPU vs CPU.

    The update is SGD because Adam's m / sqrt(v) turns gradients that are zero up to rounding (conv
    biases in front of BatchNorm) into +-lr steps of random sign: an ill-conditioned comparison. The fused
    Adam kernel is compared on its own above. Gradients are compared per tensor, normalised by the larger
    of the tensor's own scale and 1e-3 of the largest gradient (those analytic zeros again).
    """
    wnet = pytest.importorskip("nfed.model.wnet")
    from nfed.core import optim

    rng = np.random.default_rng(0)
    past = rng.random((2, 3, 32, 32), dtype=np.float32)
    current = rng.random((2, 3, 32, 32), dtype=np.float32)
    mask = (rng.random((2, 32, 32)) > 0.7).astype(np.int64)
    cpu_model = wnet.WNetCD(width=4, lambda_rec=0.1, rng=np.random.default_rng(7))
    gpu_model = wnet.WNetCD(width=4, lambda_rec=0.1, rng=np.random.default_rng(7)).to("cuda")
    results = []
    with launched() as names:
        for model, xp_ in ((cpu_model, np), (gpu_model, cp())):
            opt = optim.SGD(list(model.named_parameters()), lr=0.05, momentum=0.9)
            total, ce, rec = model.loss(*(xp_.asarray(a) for a in (past, current, mask)))
            total.backward()
            grads = {name: host(p.grad) for name, p in model.named_parameters()}
            opt.step()
            results.append(([float(host(t.data)) for t in (total, ce, rec)], grads,
                            {name: host(v) for name, v in model.state_dict().items()}))
    # the GPU counterparts of the CPU's fused ops ran: batch norm + ReLU, softmax cross-entropy, the SGD update
    assert {"bn_forward_apply_NCHW_f32", "bn_backward_apply_NCHW_f32", "softmax_cross_entropy_forward_NKHW_f32",
            "sgd_update_f32"} <= set(names)
    relu_flags = {args[10] for args in names["bn_forward_apply_NCHW_f32"]}  # the fused BN + ReLU of conv_bn_relu
    assert relu_flags == {1}, relu_flags  # every batch norm of the W-Net feeds a ReLU
    (cpu_losses, cpu_grads, cpu_state), (gpu_losses, gpu_grads, gpu_state) = results
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4)
    largest = max(float(np.max(np.abs(g))) for g in cpu_grads.values())
    for name, g in cpu_grads.items():
        scale = max(float(np.max(np.abs(g))), 1e-3 * largest)
        error = float(np.max(np.abs(gpu_grads[name] - g))) / scale
        assert error < 1e-3, f"gradient of {name}: normalised error {error:.3g}"
    for name, value in cpu_state.items():
        assert_close(gpu_state[name], value, 1e-3)


# --- the GPU branches of the benches (tiny sizes; gpu_check.sh runs the real ones) ----------------------------

@pytest.mark.parametrize("mode", precision.MODES)
def test_kernels_bench_runs_on_the_gpu(mode):
    from nfed.benchmarks.gpu_kernels import run_kernels_bench

    result = run_kernels_bench(backend.Device("cuda", 0), mode, 1, 16, 1, 1, 0, reference=False)
    assert result["precision"] == mode and sum(r["layers"] for r in result["layers"]) == 46
    assert all(r["nfed_forward_s"] > 0 and r["nfed_backward_s"] > 0 for r in result["layers"])
    assert all(r["nfed_peak_bytes"] is not None for r in result["layers"])
    assert precision.get_precision() == precision.parse_precision(None)


def test_aggregate_bench_runs_on_the_gpu():
    from nfed.benchmarks.gpu_aggregate import run_aggregate_bench

    result = run_aggregate_bench(backend.Device("cuda", 0), 3, 1003, 1, 0, reference=False)
    assert result["check_max_error"] < 1e-4
    assert result["copy_gb_s"] > 0 and result["nfed_kernel_gb_s"] > 0 and result["aggregator_gb_s"] > 0
