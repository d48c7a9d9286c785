"""The W-Net-CD network, its checkpoints (HDF5 weights with metadata) and exports (safetensors, ONNX).

May import nfed.common, nfed.gpu and nfed.core.
"""
