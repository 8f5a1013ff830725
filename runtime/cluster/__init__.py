"""What the cluster holds: the devices of a host, found through NVML with a clean fallback
when there is no NVIDIA driver. Imports the standard library and NVML's bindings only.
"""
