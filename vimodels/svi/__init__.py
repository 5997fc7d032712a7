"""SVI: binding a model to data, the fit loop, ELBOs, convergence, averaging, guide draws."""
