"""The runtime Triton executes for LatentSync: what the Python-backend model.py files share (backend.py), the
`lipsync` stream service and its BLS calls, the `denoiser` loop, custom metrics, stand-ins, and `latentsync-serve`."""
