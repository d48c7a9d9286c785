"""One district's model work: the training configuration and loop, the local and centralised study columns,
and prediction with a trained model.

May import nfed.common, nfed.gpu, nfed.core, nfed.model, nfed.data and nfed.runs.
"""
