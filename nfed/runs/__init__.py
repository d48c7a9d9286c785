"""A run folder on disk: its results tables, its lock against a second process and its status file.

May import nfed.common only.
"""
