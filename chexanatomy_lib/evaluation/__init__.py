"""Evaluation: the project's one metrics module, the predictions format, baselines and scoring.

Submodules are imported explicitly (``from chexanatomy_lib.evaluation.metrics import dice``)
so that importing the package stays light.
"""
