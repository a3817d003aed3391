"""The methods behind the callbacks: pure torch (and scikit-learn where it serves), no Lightning.

Modules: :mod:`.arm` (representation drift), :mod:`.mirrored` (Forward-INF), :mod:`.coar` (component
attribution), :mod:`.dpgmm` (DP-GMM activation clusters), :mod:`.coreset` (coreset selectors and fidelity).
"""
