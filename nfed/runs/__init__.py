"""A run on disk: the run folder's layout and round history (runfolder), its results tables (results), the
district packs it reads (packs: found, fingerprinted), its lock against a second process and its status file.

May import nfed.common, nfed.gpu, nfed.core, nfed.model (checkpoints) and nfed.data (packs).
"""
