"""Runs: sweeps and comparison grids as tasks on a process pool or a Dask cluster."""
