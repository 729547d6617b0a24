"""truepolicy's client-facing API: rollouts and scoring (HTTP and gRPC) over one core object."""
