"""Learning-rate sweeps over the training job with Ray Tune (each trial is the job's own TorchTrainer)."""
