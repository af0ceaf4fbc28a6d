"""Training: data sources, pretraining a backbone, adapting it to new domains, evaluation, scores.

Builds on `model/`; produces backbone files and adapter bundles. Run `python -m training --help`.
"""
