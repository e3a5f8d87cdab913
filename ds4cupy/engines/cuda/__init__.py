"""The GPU backend: kernel compilation (compile.py), quantized products (quant_ops.py), random weights on the GPU
(random_weights.py) and the CUDA session. Importing this package does not import CuPy; its modules do so inside
functions, so CPU-only machines can import them (and compile kernels with NVRTC) without a driver.
"""
