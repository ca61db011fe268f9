"""Active testing of a model's loss: label-token evaluation (`evaluate`), acquisition sweeps with
the LURE estimator (`acquire`), and the paper's SST-2 experiment (`active-experiment`).

Reference: Berrada et al., "Scaling Up Active Testing to Large Language Models" (arXiv 2508.09093),
and its code; the spec the modules follow is `shared/specs/active_testing.md`.
"""
