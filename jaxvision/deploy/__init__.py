"""From a trained workdir to a product: prediction on image files, temperature calibration with
out-of-distribution rejection, and a StableHLO export with the preprocessing inside."""
