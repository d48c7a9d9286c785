"""One district's model work: the training configuration (what) and run environment (where: device, precision),
the training loop, the local and centralised study columns, and prediction with a trained model.

May import nfed.common, nfed.gpu, nfed.core, nfed.model, nfed.data and nfed.runs.
"""
