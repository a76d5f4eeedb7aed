"""Attention kernels for LanDiff's masks: a Pallas flash-attention kernel (GPU) and a splash-attention wrapper
(TPU), both driven by `nn.masks.MaskSpec` and registered as backends of `nn.attention.attention`."""
