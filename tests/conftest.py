"""Test environment: 8 simulated CPU devices and no network, set before jax is imported."""

import os
import tempfile

# LLVM's lowest optimisation level: the tiny test models compile 1.3-2x faster on CPU (compiling is most of the
# suite's time) and run as fast; numerics are XLA's either way (it changes code generation, not HLO).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
# Commands run in-process (`cli.main([...])`) turn on the persistent compilation cache: keep it out of the user's
# cache folder, one fresh folder per test process.
os.environ.setdefault('LANDIFF_JAX_CACHE_DIR', tempfile.mkdtemp(prefix='landiff-test-xla-cache-'))
