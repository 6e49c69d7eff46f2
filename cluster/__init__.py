"""Control plane: the only place that starts or connects to Ray."""
