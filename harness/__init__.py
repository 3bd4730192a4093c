"""trilemma: train and measure deep generative models under one runner.

The public pieces: :mod:`harness.model` (the contract every family implements and the registry),
:mod:`harness.likelihood` (bits/dim and dequantization), :mod:`harness.config` (suites),
:mod:`harness.train` (the training loop), :mod:`harness.measure` and :mod:`harness.fid`
(measurements), :mod:`harness.results` (result files) and :mod:`harness.runner` (the suite runner).
"""
__version__ = "0.1.0"
