"""Generated gRPC code for protos/truepolicy/v1 (scripts/gen_protos.py): do not edit."""
