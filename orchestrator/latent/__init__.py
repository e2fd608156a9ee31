"""The latent mode ("Mixture of Thoughts"): the group actor that runs it, its checkpoints, its experts, its training."""
