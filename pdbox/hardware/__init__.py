"""The hardware layer: GPU telemetry (NVML), CUDA MPS control and CPU telemetry.

Plain library code with no UI: the TUI and the control API read what these
modules return and never call NVML, psutil or the MPS daemon themselves.
"""
