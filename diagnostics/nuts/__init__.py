"""NUTS reference: the sampler, lockstep chains, the cached and self-checked reference."""
