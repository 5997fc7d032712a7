"""The digits VAE: minibatch training, evaluation (likelihood, gaps) and its report."""
