"""Learning-rate sweeps over the training job with Ray Tune (planned: issue 4)."""
