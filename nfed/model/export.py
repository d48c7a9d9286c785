"""Weights others can load (the optional extra nfed[export]): safetensors and ONNX.

safetensors: every state tensor under nfed's names, which are the PyTorch twin's `state_dict()` keys
(nfed/benchmarks/torch_twin.py; `load_state_dict(strict=True)` accepts them, BatchNorm's num_batches_tracked is filled
in by PyTorch), plus the model config as string metadata. Like nfed's own HDF5, the format holds only raw
tensors and JSON text: nothing is pickled on either side.
ONNX: the U-Encoder (what prediction uses) as a graph of standard operators (Conv, BatchNormalization in
inference form, Relu, MaxPool, ConvTranspose, Split/Concat, Softmax), built operator by operator with the
`onnx` package from the same weights, so no deep-learning framework is needed to export it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nfed import __version__
from nfed.common import backend
from nfed.common.atomic import atomic_path
from nfed.common.errors import ConfigError

FORMAT = "nfed W-Net-CD"
ONNX_OPSET = 17


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"export needs {module}: pip install 'nfed[export]'") from None


def model_metadata(model, tile: int) -> dict[str, str]:
    """String metadata that says what the tensors are and how to rebuild the model."""
    return {"format": FORMAT, "nfed_version": __version__, "width": str(model.width),
            "classes": str(model.classes), "lambda_rec": str(model.lambda_rec), "tile": str(tile),
            "inputs": "past, current: float32 [N, 3, H, W] in [0, 1], H and W multiples of 16",
            "outputs": "change logits [N, classes, H, W] (class 0 = no change)"}


def export_safetensors(model, tile: int, path: str | os.PathLike) -> Path:
    """Write every state tensor of `model` (parameters and BatchNorm statistics) as safetensors, atomically."""
    _require("safetensors")
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(backend.to_numpy(value)) for name, value in model.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=model_metadata(model, tile))
    return Path(path)


def export_onnx(model, tile: int, path: str | os.PathLike) -> Path:
    """Write the U-Encoder as ONNX: inputs past, current; outputs logits and probabilities (softmax)."""
    onnx = _require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    state = {name: np.ascontiguousarray(backend.to_numpy(value), np.float32)
             for name, value in model.state_dict().items() if name.startswith("encoder.")}
    graph = _EncoderGraph(helper, dict(model.named_modules()))
    x = graph.node("Concat", ["past", "current"], axis=0)
    skips = []
    for level in range(1, 6):
        if level > 1:
            x = graph.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        x = graph.block(f"encoder.e{level}", x)
        halves = graph.node("Split", [x], outputs=2, axis=0)
        skips.append(graph.node("Concat", halves, axis=1))
    d = skips[4]
    for level in range(4, 0, -1):
        up = graph.node("ConvTranspose", [d, f"encoder.up{level}.weight", f"encoder.up{level}.bias"],
                        kernel_shape=[2, 2], strides=[2, 2])
        d = graph.block(f"encoder.d{level}", graph.node("Concat", [up, skips[level - 1]], axis=1))
    graph.node("Conv", [d, "encoder.head.weight", "encoder.head.bias"], kernel_shape=[1, 1], name="logits")
    graph.node("Softmax", ["logits"], axis=1, name="probabilities")

    image = ["N", 3, "H", "W"]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, image) for name in ("past", "current")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", model.classes, "H", "W"])
               for name in ("logits", "probabilities")]
    initializers = [numpy_helper.from_array(value, name) for name, value in state.items()
                    if name in graph.used]
    onnx_model = helper.make_model(helper.make_graph(graph.nodes, "wnet_cd_u_encoder", inputs, outputs,
                                                     initializers),
                                   opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="nfed",
                                   producer_version=__version__)
    helper.set_model_props(onnx_model, model_metadata(model, tile))
    onnx.checker.check_model(onnx_model, full_check=True)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save_model(onnx_model, str(tmp))
    return Path(path)


class _EncoderGraph:
    """Collects ONNX nodes; names intermediate values t0, t1, ... and records which weights are used."""

    def __init__(self, helper, modules: dict):
        self.helper, self.modules, self.nodes, self.used, self._count = helper, modules, [], set(), 0

    def node(self, op: str, inputs: list[str], *, outputs: int = 1, name: str | None = None, **attributes):
        names = [name] if name else [self._fresh() for _ in range(outputs)]
        self.used.update(i for i in inputs if i.startswith("encoder."))
        self.nodes.append(self.helper.make_node(op, inputs, names, **attributes))
        return names[0] if outputs == 1 else names

    def block(self, prefix: str, x: str) -> str:
        """conv3x3 -> BatchNorm (running statistics) -> ReLU, twice (nfed.model.wnet.ConvBlock)."""
        for sub in ("1", "2"):
            conv, bn = f"{prefix}.conv{sub}", f"{prefix}.bn{sub}"
            x = self.node("Conv", [x, f"{conv}.weight", f"{conv}.bias"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            x = self.node("BatchNormalization", [x, f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean",
                                                 f"{bn}.running_var"], epsilon=self.modules[bn].eps)
            x = self.node("Relu", [x])
        return x

    def _fresh(self) -> str:
        self._count += 1
        return f"t{self._count}"

