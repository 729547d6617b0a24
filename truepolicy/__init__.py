"""truepolicy: truly on-policy RL rollouts (command line, demo and process helpers)."""
