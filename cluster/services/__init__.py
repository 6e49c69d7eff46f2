"""The control plane's parts: one service per resource over the store (cluster.store), and what they share
(base.Core). cluster.controlplane composes them into the one actor and runs the reconciler."""
