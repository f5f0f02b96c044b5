"""Training: state, optimizer, losses, the jitted steps and the loop."""
