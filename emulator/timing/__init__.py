"""A discrete-event timing model of a fusee cluster: the real sans-IO operations, run in
simulated time on a hardware profile (``profile``), so a laptop can answer what 128 clients
on 22 machines would see (``engine``)."""
