"""SoftRoCE in a VM: how the verbs backend is tested on machines whose kernel has no RDMA."""
