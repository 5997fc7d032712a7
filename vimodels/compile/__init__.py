"""Graph compilation: recording a traced value-and-gradient graph, the compiled SVI step."""
